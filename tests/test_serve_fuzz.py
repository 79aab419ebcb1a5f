"""Schema-driven fuzzing (Schemathesis) of the served OpenAPI document against a real
`searchsvc serve` process: for every operation, generated requests (valid and not) get no
5xx and no answer that contradicts the schema. Bounded: a fixed number of cases each."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from catalog_factory import make_catalog
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from serve_harness import Server, running_server

from searchsvc.cli import main

pytestmark = pytest.mark.slow
CASES_PER_OPERATION = 25
# A folder ingest reads any path it is given on the server's machine: fuzzed paths
# ("/", ".") would scan the file system; a switch to an existing version re-embeds the
# whole catalog. Their errors are covered in test_serve_e2e.
NOT_FUZZED = {"/v1/ingest", "/v1/admin/switch-embedder"}
PARAMETERLESS = {"/healthz", "/readyz", "/metrics"}  # one possible request each
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    catalog = make_catalog(root / "catalog", products=6, views=2)
    home = root / "home"
    result = CliRunner().invoke(
        main, ["--home", str(home), "ingest", str(catalog.root), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    with running_server(home) as server:
        yield server


def test_every_operation_no_server_error_no_schema_violation(fuzz_server: Server) -> None:
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    cases_run: Counter[tuple[str, str]] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    fuzzed = [op for op in operations if op.path not in NOT_FUZZED]
    assert len(fuzzed) >= 10

    def fuzzer(operation: Any, mode: GenerationMode) -> Any:
        name = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=CASES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=60)
            cases_run[(name, mode.value)] += 1

        return fuzz

    for operation in fuzzed:
        fuzzer(operation, GenerationMode.POSITIVE)()
        if operation.path not in PARAMETERLESS:
            # Requests that break the schema: each must be refused with a 4xx it declares.
            fuzzer(operation, GenerationMode.NEGATIVE)()

    names = {name for name, _ in cases_run}
    print(f"\nschemathesis: {sum(cases_run.values())} cases over {len(names)} operations")
    for (name, mode), count in sorted(cases_run.items()):
        print(f"  {count:4d}  {mode:8s}  {name}")
    assert len(names) == len(fuzzed)
    for (name, _), count in cases_run.items():
        assert count >= (1 if name.split()[1] in PARAMETERLESS else 5), name
