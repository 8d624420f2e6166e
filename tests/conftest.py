"""Shared fixtures live in tests/fixtures/, one module per real service the tests start."""

pytest_plugins = [
    "tests.fixtures.s3",
]
