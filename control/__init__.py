"""The control API on top of the streaming core: Quart-Trio routes per resource, auth, plan limits,
provisioning and providers, edge publishing, billing, dev environments, jobs; and the assembly that
wires these rules into the core and starts everything."""
