"""Persistent state: peewee models, the database, migrations and the small functions that read
and write them. Nothing outside this package writes SQL, and this package imports nothing else of ours."""
