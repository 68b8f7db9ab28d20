"""Container providers: one interface (control/providers/base.py), implementations chosen by
configuration (`ZLH_PROVIDER`): `local` (the embedded default) and `proxmox`."""
