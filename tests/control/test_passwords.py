"""Password hashing (control/auth/passwords.py): argon2id with the configured parameters; an unknown
email is checked against a dummy hash made with the very same parameters (same cost as a wrong
password); scrypt hashes from before still log in and are replaced by argon2id; outdated argon2
parameters are rehashed at login."""

from __future__ import annotations

import base64
import hashlib
import os

import argon2

from control.auth.passwords import HashCost, check_password_sync, dummy_hash, hash_password_sync
from control.config import Settings
from storage.models import User
from tests.conftest import TEST_SECRET, Gateway
from tests.environments.conftest import in_db


def test_the_dummy_hash_has_the_parameters_of_real_hashes() -> None:
    for cost in (HashCost.from_settings(Settings.from_env({"JWT_SECRET": TEST_SECRET})), HashCost(1, 64, 1)):
        real = argon2.extract_parameters(hash_password_sync("correct horse battery", cost))
        assert argon2.extract_parameters(dummy_hash(cost)) == real
        assert (real.type, real.time_cost, real.memory_cost, real.parallelism) == (
            argon2.Type.ID, cost.time_cost, cost.memory_kib, cost.parallelism)
    defaults = Settings.from_env({"JWT_SECRET": TEST_SECRET})
    assert (defaults.argon2_time_cost, defaults.argon2_memory_kib, defaults.argon2_parallelism) == (3, 65536, 4)


def test_unknown_and_wrong_are_both_refused() -> None:
    cost = HashCost(1, 64, 1)
    stored = hash_password_sync("right-password", cost)
    assert check_password_sync("right-password", stored, cost).valid
    assert not check_password_sync("wrong-password", stored, cost).valid
    assert not check_password_sync("right-password", None, cost).valid
    assert not check_password_sync("right-password", "not-a-hash", cost).valid


def _scrypt(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1024, r=8, p=1, dklen=32)
    return f"scrypt$1024$8$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


async def stored_hash(user_id: int) -> str:
    return await in_db(lambda: User.get_by_id(user_id).password_hash)


async def test_scrypt_and_outdated_hashes_are_replaced_at_login(gateway: Gateway) -> None:
    session = await gateway.register("old@example.com", "password123")
    user_id = session["user"]["id"]
    for old in (_scrypt("password123"), argon2.PasswordHasher(time_cost=2, memory_cost=64, parallelism=1).hash(
            "password123")):
        await in_db(lambda old=old: User.update(password_hash=old).where(User.id == user_id).execute())
        wrong = await gateway.client.post("/api/auth/login", json={"email": "old@example.com", "password": "nope1234"})
        assert wrong.status_code == 401 and await stored_hash(user_id) == old  # only a proven password rehashes
        login = await gateway.client.post("/api/auth/login", json={"email": "old@example.com",
                                                                    "password": "password123"})
        assert login.status_code == 200, login.text
        new = await stored_hash(user_id)
        params = argon2.extract_parameters(new)
        assert (params.type, params.time_cost, params.memory_cost) == (argon2.Type.ID, 1, 64)
        again = await gateway.client.post("/api/auth/login", json={"email": "old@example.com",
                                                                    "password": "password123"})
        assert again.status_code == 200 and await stored_hash(user_id) == new  # current: left alone
