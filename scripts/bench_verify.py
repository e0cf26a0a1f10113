"""Benchmark the resource-side verifier of the SDK: task-token verifications per second on one core.

    .venv/bin/python scripts/bench_verify.py [--seconds 3]

A broker runs in process (embedded defaults in a temporary directory); the SDK's ``BrokerClient`` gets
one bearer and one DPoP-bound refund token from it, and a ``TaskTokenVerifier`` (JWKS fetched once and
cached) verifies them in a loop on one thread:

- bearer: ``verify_request`` of the same token (signature, header, claims, intent shape);
- DPoP:   the same plus a DPoP proof per request (its signature, htm/htu, ath, iat, jti replay cache).
  Proofs are made before the clock starts, one per verification (a proof is single use).

Both numbers include ``require_intent`` (the check a service makes against the actual request).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchinfo import load_average, markdown_caption
from fastapi.testclient import TestClient
from nhi_broker_client import BrokerClient, TaskToken, TaskTokenVerifier

from broker.api.app import create_app
from broker.attest.dev import DevIssuer, DevUserIssuer
from broker.clock import SystemClock
from broker.config import Settings

REPO = Path(__file__).resolve().parent.parent
SUPPORT = "spiffe://example.org/ns/support/sa/support-assistant"
RESOURCE = "customers/c-42/orders/ord-1001"
CONTEXT = {"customer": "c-42", "amount": 20, "currency": "EUR"}
URL = "https://payments.example/customers/c-42/orders/ord-1001/refunds"


def _rate(verifier: TaskTokenVerifier, token: TaskToken, seconds: float, proofs: list[str] | None
          ) -> tuple[float, float]:
    """Verifications per second of wall time, and CPU µs per verification (what a busy machine distorts least)."""
    auth = f"{token.token_type} {token.access_token}"
    done = 0
    cpu0 = time.thread_time()
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            proof = proofs[done] if proofs is not None else None
            verified = verifier.verify_request(auth, proof, "POST", URL)
            verified.require_intent("payments.refund", RESOURCE, CONTEXT)
            done += 1
    return done / (time.perf_counter() - start), (time.thread_time() - cpu0) * 1e6 / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case (default 3)")
    parser.add_argument("--markdown", action="store_true", help="also print the table for the README")
    args = parser.parse_args()
    start_load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", policies_dir=REPO / "policies")
        with TestClient(create_app(settings), base_url=settings.issuer_url) as http:
            issuer = DevIssuer.load_or_create(settings.data_dir)

            users = DevUserIssuer.load_or_create(settings.data_dir)

            def identity() -> str:
                return issuer.mint(SUPPORT, "nhi-broker", clock=SystemClock())

            def customer() -> str:  # refunds are for a verified customer (delegated), as the policy requires
                return users.mint_user(CONTEXT["customer"], "nhi-broker", clock=SystemClock())

            bearer = BrokerClient(settings.issuer_url, actor=identity, user_token=customer, dpop=False,
                                  http_client=http)
            bound = BrokerClient(settings.issuer_url, actor=identity, user_token=customer, http_client=http)
            bearer_token = bearer.get_token("payments-api", "payments.refund", RESOURCE, CONTEXT)
            dpop_token = bound.get_token("payments-api", "payments.refund", RESOURCE, CONTEXT)
            verifier = TaskTokenVerifier(settings.issuer_url, "payments-api", http_client=http)
            verifier.verify_request(f"Bearer {bearer_token.access_token}", None, "POST", URL)  # warm the JWKS cache

            bearer_rate, bearer_cpu = _rate(verifier, bearer_token, args.seconds, None)
            # Enough single-use proofs for the bearer rate (DPoP is slower), made before timing.
            count = int(bearer_rate * args.seconds) + 1000
            proofs = [dpop_token.headers("POST", URL)["DPoP"] for _ in range(count)]
            dpop_rate, dpop_cpu = _rate(verifier, dpop_token, args.seconds, proofs)
    print(f"TaskTokenVerifier, one thread, ES256 task tokens ({args.seconds:g} s per case)")
    print(f"  bearer token            {bearer_rate:8.0f} verifications/s  ({1e6 / bearer_rate:6.0f} us each)")
    print(f"  DPoP token + proof      {dpop_rate:8.0f} verifications/s  ({1e6 / dpop_rate:6.0f} us each)")
    if args.markdown:
        print()
        print(markdown_caption(start_load) + " SDK `TaskTokenVerifier`, one thread, ES256.\n")
        print("| case | verifications/s | µs each (wall) | CPU µs each |")
        print("|---|---|---|---|")
        print(f"| bearer token | {bearer_rate:,.0f} | {1e6 / bearer_rate:,.0f} | {bearer_cpu:,.0f} |")
        print(f"| DPoP-bound token + proof | {dpop_rate:,.0f} | {1e6 / dpop_rate:,.0f} | {dpop_cpu:,.0f} |")


if __name__ == "__main__":
    main()
