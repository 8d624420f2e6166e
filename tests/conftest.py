"""Shared fixtures live in tests/fixtures/, one module per real service or data set the tests use."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.datasets",
    "tests.fixtures.mlflow",
    "tests.fixtures.fake_k8s",
]
