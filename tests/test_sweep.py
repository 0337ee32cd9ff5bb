"""The Hugging Face sweep (benchmarks/sweep_transformers.py) on a fixed sample of architectures:
each builds from its shrunk default config, runs, and gets a report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pytest_gradcheck import Report

SAMPLE = ("bert", "gpt2", "llama", "t5", "vit", "convnext")
"""Quick to build (well under a second each once transformers is imported)."""


@pytest.fixture(scope="module")
def sweep() -> ModuleType:
    pytest.importorskip("transformers")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sweep_transformers.py"
    spec = importlib.util.spec_from_file_location("sweep_transformers", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.slow
@pytest.mark.parametrize("model_type", SAMPLE)
def test_sweep_builds_and_checks(sweep: ModuleType, model_type: str) -> None:
    assert model_type in sweep.model_types()
    record, report = sweep.build_and_check(model_type, timeout=60)
    assert not record.error, f"{model_type}: {record.error}"
    assert record.built, model_type
    assert record.ran, model_type
    assert record.checked, model_type
    assert isinstance(report, Report)
    assert record.ok == report.ok
    assert record.params > 0
    assert record.inputs, "the batch carries the model's main input"


@pytest.mark.slow
def test_sweep_records_an_error_instead_of_raising(sweep: ModuleType) -> None:
    record, report = sweep.build_and_check("no_such_model_type")
    assert report is None
    assert not record.built
    assert "no auto-model class" in record.error
    assert "attempted (a class found): 0" in sweep.summarize([record])
