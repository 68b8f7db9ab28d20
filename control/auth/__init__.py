"""Authentication: passwords, the JWT kinds, and the auth routes."""
