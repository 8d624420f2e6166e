"""Progress reports to a Kubeflow Trainer TrainJob's status (status.trainerStatus) from rank 0.

The controller's endpoint is played by an HTTPS server on 127.0.0.1 with a certificate made for
the test (the Trainer's own CA in a cluster); it records each request's body and bearer token.
The reports are checked against the trainerStatus schema of Trainer v2.3.0's vendored CRD. The
tests with that server are in the integration tier; the trainings are the toy loop's (milliseconds).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sam3_core.errors import ConfigError
from sam3_core.train.config import LoopConfig
from sam3_core.train.trainer import HookBase, Trainer
from sam3_core.train.trainjob_status import (
    CA_CERT_ENV,
    TOKEN_ENV,
    URL_ENV,
    StatusEndpoint,
    TrainJobStatusReporter,
    trainer_status,
    trainjob_status_hook,
)
from tests.fixtures.fake_k8s import TRAINJOB_CRD, load_crd, strict_schema
from tests.sam3_core.train.test_trainer_loop import toy_trainer


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (it is its own CA) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@dataclass
class FakeController:
    """The Trainer controller's status endpoint: records (token, trainerStatus) per POST."""

    url: str = ""
    ca_cert: Path = Path()
    token_file: Path = Path()
    # HTTP status to answer with; 200 accepts
    answer: int = 200
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def env(self) -> dict[str, str]:
        return {URL_ENV: self.url, CA_CERT_ENV: str(self.ca_cert), TOKEN_ENV: str(self.token_file)}

    def endpoint(self) -> StatusEndpoint:
        endpoint = StatusEndpoint.from_env(self.env())
        assert endpoint is not None
        return endpoint

    def statuses(self) -> list[dict[str, Any]]:
        with self.lock:
            return [status for _, status in self.received]


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[FakeController]:
    cert, key = self_signed(tmp_path, "trainer-controller")
    fake = FakeController(ca_cert=cert, token_file=tmp_path / "token")
    fake.token_file.write_text("token-1\n", encoding="utf-8")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with fake.lock:
                fake.received.append((self.headers["Authorization"], body["trainerStatus"]))
            self.send_response(fake.answer)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    fake.url = f"https://127.0.0.1:{server.server_address[1]}/apis/trainer.kubeflow.org/v1alpha1/status"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def status_schema() -> Any:
    import jsonschema

    crd = load_crd(TRAINJOB_CRD)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    return jsonschema.Draft7Validator(strict_schema(schema["properties"]["trainerStatus"]))


class Flushed(HookBase):
    """After every step, waits until the reporter has sent its report: the test sees every report."""

    def __init__(self, reporter: TrainJobStatusReporter) -> None:
        self.reporter = reporter

    def after_step(self) -> None:
        self.reporter.flush(10)


def reporting(trainer: Trainer, endpoint: StatusEndpoint, every_s: float) -> None:
    """`trainer` with a reporter on a ticking clock, each report sent before the next step."""
    reporter = TrainJobStatusReporter(endpoint, every_s=every_s, clock=Ticks())
    trainer.register(reporter)
    trainer.register(Flushed(reporter))


class Ticks:
    """A clock that advances 1 s per reading: every step looks one second long."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_no_hook_outside_a_trainjob_that_asks_for_progress() -> None:
    assert trainjob_status_hook(10, environ={}) is None


@pytest.mark.integration
def test_rank_0_of_a_trainjob_that_asks_for_progress_gets_the_hook(controller) -> None:
    hook = trainjob_status_hook(10, environ=controller.env())

    assert isinstance(hook, TrainJobStatusReporter) and hook.endpoint.url == controller.url


@pytest.mark.integration
def test_no_hook_when_switched_off(controller) -> None:
    assert trainjob_status_hook(0, environ=controller.env()) is None


@pytest.mark.integration
def test_a_partial_endpoint_is_switched_off_with_a_warning(controller, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert StatusEndpoint.from_env({URL_ENV: controller.url}) is None

    assert CA_CERT_ENV in caplog.text and TOKEN_ENV in caplog.text


def test_reporting_more_often_than_the_trainer_takes_is_refused() -> None:
    with pytest.raises(ConfigError, match="trainjob_status_every_s"):
        LoopConfig(trainjob_status_every_s=2)


def test_status_has_percent_eta_latest_metrics_and_the_time(status_schema) -> None:
    now = dt.datetime(2026, 8, 1, 12, 0, 0, tzinfo=dt.UTC)

    status = trainer_status(30, 400, 1234.4, {"train/loss": 0.123456789, "val/bbox_AP": float("nan")}, now)

    assert list(status_schema.iter_errors(status)) == []
    assert status["progressPercentage"] == 7 and status["estimatedRemainingSeconds"] == 1234
    assert status["metrics"] == [
        {"name": "step", "value": "30/400"},
        {"name": "train/loss", "value": "0.123457"},
        {"name": "val/bbox_AP", "value": "nan"},
    ]
    assert status["lastUpdatedTime"] == "2026-08-01T12:00:00Z"


def test_status_keeps_to_the_crds_limits(status_schema) -> None:
    metrics = {f"train/{'x' * 80}_{i:03d}": float(i) for i in range(300)}

    status = trainer_status(0, 10, None, metrics, dt.datetime.now(dt.UTC))

    assert list(status_schema.iter_errors(status)) == []
    assert len(status["metrics"]) == 256 and "estimatedRemainingSeconds" not in status


@pytest.mark.integration
def test_training_reports_progress_to_100_percent_with_eta_and_metrics(controller, status_schema, tmp_path) -> None:
    trainer = toy_trainer(tmp_path, max_steps=12, log_every=2)
    reporting(trainer, controller.endpoint(), every_s=4)

    trainer.fit()

    statuses = controller.statuses()
    assert all(not list(status_schema.iter_errors(s)) for s in statuses)
    percents = [s["progressPercentage"] for s in statuses]
    assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(percents)
    # every 4 s of a clock that ticks once per step and twice per report: every other step
    assert 4 <= len(statuses) < 12
    assert any(s.get("estimatedRemainingSeconds", 0) > 0 for s in statuses[1:-1])
    assert statuses[-1]["estimatedRemainingSeconds"] == 0
    final = {m["name"]: m["value"] for m in statuses[-1]["metrics"]}
    assert final["step"] == "12/12" and float(final["train/loss"]) == pytest.approx(
        trainer.history[-1]["train/loss"], rel=1e-5
    )


@pytest.mark.integration
def test_each_report_reads_the_rotated_token_again(controller) -> None:
    endpoint = controller.endpoint()
    status = trainer_status(1, 2, None, {}, dt.datetime.now(dt.UTC))

    endpoint.post(status)
    controller.token_file.write_text("token-2\n", encoding="utf-8")
    endpoint.post(status)

    assert [token for token, _ in controller.received] == ["Bearer token-1", "Bearer token-2"]


@pytest.mark.integration
def test_an_untrusted_certificate_is_not_reported_to_and_training_goes_on(controller, tmp_path, caplog) -> None:
    other_ca, _ = self_signed(tmp_path, "someone-else")
    endpoint = StatusEndpoint(controller.url, str(other_ca), str(controller.token_file))
    trainer = toy_trainer(tmp_path, max_steps=6)
    reporting(trainer, endpoint, every_s=1)

    with caplog.at_level(logging.WARNING):
        trainer.fit()

    assert trainer.step == 6 and controller.received == []
    assert caplog.text.count("TrainJob progress not reported") == 1 and "CERTIFICATE_VERIFY_FAILED" in caplog.text


@pytest.mark.integration
def test_a_refusing_controller_is_one_warning_and_training_goes_on(controller, tmp_path, caplog) -> None:
    controller.answer = 403
    trainer = toy_trainer(tmp_path, max_steps=6)
    reporting(trainer, controller.endpoint(), every_s=1)

    with caplog.at_level(logging.WARNING):
        trainer.fit()

    assert trainer.step == 6 and len(controller.received) >= 2
    assert caplog.text.count("TrainJob progress not reported") == 1 and "HTTP 403" in caplog.text
