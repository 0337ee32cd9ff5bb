"""The ``pytest_gradcheck_*`` hooks: a conftest check fails a test, a conftest convention is
used by a policy, a default loss for a model family, report post-processing, the same hooks
from the Python API, and the ready-to-paste examples in the hookspecs' docstrings.
"""

from __future__ import annotations

import re
import textwrap
import types
from collections.abc import Iterator

import pluggy
import pytest
import torch
from torch import nn

from pytest_gradcheck import GradcheckError, Problem, check_gradients, hooks, hookspecs
from pytest_gradcheck.hooks import plugin_manager
from pytest_gradcheck.hookspecs import hookimpl
from pytest_gradcheck.session import use_builtins

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

HOOK_NAMES = [name for name in dir(hookspecs) if name.startswith("pytest_gradcheck_")]

MODELS = """
import torch
from torch import nn

torch.set_num_threads(1)


def relu_mlp():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 8))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(8, 2))
    return model


def sample():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
"""

HEAD_CHECK = """
import pytest
from pytest_gradcheck import Problem


@pytest.hookimpl
def pytest_gradcheck_check(layers, structure, loss, settings, notes):
    notes.append("the team's head check ran")
    return [
        Problem(
            kind="head_too_small",
            layer=layer.display_name,
            param=None,
            value=layer.grad_norm,
            limit=1e9,
            message="the team wants head gradients above 1e9",
            hint="this is a test of the hook",
        )
        for layer in layers
        if layer.name == "head"
    ]
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(
        "[pytest]\naddopts = -p no:benchmark -p no:cacheprovider\nfilterwarnings =\n    error\n"
        "gradcheck_device = cpu\n"
    )
    pytester.makepyfile(models=MODELS)
    return pytester


def test_a_conftest_check_fails_tests_in_its_directory_only(inner: pytest.Pytester) -> None:
    team = inner.mkpydir("team")
    (team / "conftest.py").write_text(HEAD_CHECK)
    test = "from models import relu_mlp, sample\n\ndef test_model(gradcheck):\n    gradcheck(relu_mlp(), sample())\n"
    (team / "test_team.py").write_text(test)
    (team / "gradcheck_team.yaml").write_text(
        "models:\n  mlp:\n    model: models:relu_mlp\n    batch: {shape: [4, 8]}\n"
    )
    other = inner.mkpydir("other")
    (other / "test_other.py").write_text(test)
    result = inner.runpytest("--junitxml=out.xml")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_model _*",
            "E*gradient check failed: 1 problem(s) (head_too_small) in 1 of 2 layers on cpu",
            "E*head*head_too_small*the team wants head gradients above 1e9",
            "E*hint (head_too_small): this is a test of the hook",
            "E*note: the team's head check ran",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*_ mlp _*", "gradient check failed: 1 problem(s) (head_too_small)*"]
    )
    result.stdout.fnmatch_lines(["*unhealthy*team/gradcheck_team.yaml::mlp*head_too_small:head*"])
    assert 'value="head_too_small:head"' in (inner.path / "out.xml").read_text()


def test_a_conftest_convention_is_switched_on_by_a_policy(inner: pytest.Pytester) -> None:
    inner.makeconftest(
        """
        import pytest
        from pytest_gradcheck.conventions import Convention


        def max_modules(structure, layers, params):
            count = len(structure.modules)
            if count > params["max"]:
                return [("<root>", f"{count} modules, at most {params['max']}")]
            return []


        @pytest.hookimpl
        def pytest_gradcheck_conventions():
            return [Convention("max_modules", max_modules, {"max": 100})]
        """
    )
    inner.makefile(".yaml", policy="conventions:\n  max_modules: {max: 2}\n")
    inner.makefile(".yaml", typo="conventions:\n  max_module: {max: 2}\n")
    inner.makepyfile(
        test_conv="from models import relu_mlp, sample\n\n"
        "def test_model(gradcheck):\n    gradcheck(relu_mlp(), sample())\n"
    )
    result = inner.runpytest("--gradcheck-policy=policy.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["E*<root>*convention*4 modules, at most 2 (convention max_modules, policy.yaml:2)"]
    )
    typo = inner.runpytest("--gradcheck-policy=typo.yaml")
    assert typo.ret == pytest.ExitCode.USAGE_ERROR
    typo.stderr.fnmatch_lines(
        ["ERROR: *typo.yaml:2: unknown convention 'max_module'; did you mean 'max_modules'?"]
    )


def test_default_loss_for_a_model_family(inner: pytest.Pytester) -> None:
    inner.makeconftest(
        """
        import pytest


        @pytest.hookimpl
        def pytest_gradcheck_default_loss(model, output, settings):
            family = getattr(model, "family", None)
            if family == "regressor":
                return output.pow(2).sum()
            if family == "broken":
                raise ValueError("boom")
            return None
        """
    )
    inner.makepyfile(
        test_loss="""
        import pytest
        import torch
        from models import relu_mlp, sample


        def test_family_loss(gradcheck):
            model = relu_mlp()
            model.family = "regressor"
            report = gradcheck(model, sample())
            with torch.no_grad():
                expected = float(model(sample()).pow(2).sum())
            assert report.loss == pytest.approx(expected)


        def test_other_models_keep_the_default(gradcheck):
            model = relu_mlp()
            report = gradcheck(model, sample())
            with torch.no_grad():
                assert report.loss != pytest.approx(float(model(sample()).pow(2).sum()))


        def test_an_explicit_loss_wins(gradcheck):
            model = relu_mlp()
            model.family = "broken"
            report = gradcheck(model, sample(), loss_fn=lambda out: out.mean())
            with torch.no_grad():
                assert report.loss == pytest.approx(float(model(sample()).mean()))


        def test_a_failing_hook_is_named(gradcheck):
            model = relu_mlp()
            model.family = "broken"
            gradcheck(model, sample())
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*GradcheckError: a pytest_gradcheck_default_loss hook raised ValueError at conftest.py:*: boom"
        ]
    )


def test_reports_are_post_processed_in_turn(inner: pytest.Pytester) -> None:
    inner.makeconftest(
        """
        import dataclasses
        import pytest


        class Second:
            @pytest.hookimpl(trylast=True)
            def pytest_gradcheck_report(self, report):
                return dataclasses.replace(report, notes=(*report.notes, f"second saw {len(report.notes)} note(s)"))


        def pytest_configure(config):
            config.pluginmanager.register(Second(), "second")


        @pytest.hookimpl
        def pytest_gradcheck_report(report):
            if getattr(report, "ok", True) and report.settings.get("seed") == 7:
                return 42  # not a Report: an error that names this plugin
            return dataclasses.replace(report, notes=(*report.notes, "first: ask #ml-platform"))
        """
    )
    inner.makepyfile(
        test_report="""
        from models import relu_mlp, sample


        def test_unhealthy(gradcheck):
            gradcheck(relu_mlp(), sample(), max_norm=1e-9)


        def test_notes_on_healthy_reports(gradcheck):
            report = gradcheck(relu_mlp(), sample())
            assert report.notes[-2:] == ("first: ask #ml-platform", "second saw 1 note(s)")


        def test_wrong_return(gradcheck):
            gradcheck(relu_mlp(), sample(), seed=7)
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["E*note: first: ask #ml-platform", "E*note: second saw 1 note(s)"])
    result.stdout.fnmatch_lines(
        ["E*GradcheckError: pytest_gradcheck_report in *conftest.py returned int; return a Report*"]
    )


# -- the same hooks without pytest ---------------------------------------------------------------


class _Always:
    @hookimpl
    def pytest_gradcheck_check(self, layers, structure, loss, settings, notes):  # type: ignore[no-untyped-def]
        return [Problem("api_check", layers[0].display_name, None, 1.0, 0.0, "from the Python API")]


@pytest.fixture
def registered() -> Iterator[None]:
    manager = plugin_manager()
    plugin = manager.register(_Always(), "test-always")
    assert plugin is not None
    try:
        yield
    finally:
        manager.unregister(name="test-always")


def test_python_api_runs_registered_checks_and_builtins_run_last(registered: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    report = check_gradients(model, torch.randn(3, 4), device="cpu")
    assert [(p.kind, p.layer) for p in report.problems] == [("api_check", "0")]
    impls = plugin_manager().hook.pytest_gradcheck_check.get_hookimpls()
    builtin = next(i for i in impls if i.plugin_name == "gradcheck-checks")
    assert builtin.trylast
    conventions = plugin_manager().hook.pytest_gradcheck_conventions.get_hookimpls()
    assert next(i for i in conventions if i.plugin_name == "gradcheck-conventions").trylast


def test_plain_functions_count_as_implementations_outside_pytest() -> None:
    plugin = types.ModuleType("plain_plugin")
    exec(  # a module with an unmarked hook function, like a conftest.py
        "def pytest_gradcheck_report(report):\n"
        "    import dataclasses\n"
        "    return dataclasses.replace(report, notes=('plain',))\n",
        plugin.__dict__,
    )
    manager = plugin_manager()
    manager.register(plugin, "test-plain")
    try:
        torch.manual_seed(0)
        report = check_gradients(nn.Linear(3, 2), torch.randn(2, 3), device="cpu")
    finally:
        manager.unregister(name="test-plain")
    assert report.notes == ("plain",)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "raise ValueError('bug in my hook')",
            r"a pytest_gradcheck_conventions hook raised ValueError at <plain>:2: bug in my hook",
        ),
        ("return 5", "a pytest_gradcheck_conventions hook returned int; return a list"),
    ],
)
def test_a_broken_conventions_hook_is_a_gradcheck_error(body: str, message: str) -> None:
    plugin = types.ModuleType("broken_conventions")
    exec(
        compile(f"def pytest_gradcheck_conventions():\n    {body}\n", "<plain>", "exec"),
        plugin.__dict__,
    )
    manager = plugin_manager()
    manager.register(plugin, "test-broken")
    try:
        with pytest.raises(GradcheckError, match=re.escape(message)):
            hooks.conventions(manager.hook)
    finally:
        manager.unregister(name="test-broken")


# -- the hookspecs' docstrings -------------------------------------------------------------------


def _example(name: str) -> str:
    doc = getattr(hookspecs, name).__doc__ or ""
    match = re.search(r"Example ``conftest.py``::\n\n(.*?)(?:\n    (?:and|\S)|\Z)", doc, re.S)
    assert match, f"{name} has no conftest example"
    return textwrap.dedent(match.group(1))


def test_hookspecs_are_registered_in_pytest(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfigure()
    for name in HOOK_NAMES:
        assert getattr(config.hook, name).spec is not None, name
    # The built-in implementations are registered by the first check, policy or suite that
    # calls the hooks (loading the plugin imports neither the checks nor the policy), once.
    builtins = ("gradcheck-checks", "gradcheck-conventions")
    assert [config.pluginmanager.get_plugin(name) for name in builtins] == [None, None]
    use_builtins(config)
    use_builtins(config)
    assert all(config.pluginmanager.get_plugin(name) is not None for name in builtins)
    impls = config.hook.pytest_gradcheck_check.get_hookimpls()
    assert [i.trylast for i in impls if i.plugin_name == "gradcheck-checks"] == [True]
    assert {name for name in HOOK_NAMES} == {
        "pytest_gradcheck_check",
        "pytest_gradcheck_conventions",
        "pytest_gradcheck_default_loss",
        "pytest_gradcheck_report",
    }


def test_a_conftest_can_block_the_builtins(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfigure()
    config.pluginmanager.set_blocked("gradcheck-checks")
    use_builtins(config)
    assert config.pluginmanager.get_plugin("gradcheck-checks") is None
    assert config.pluginmanager.get_plugin("gradcheck-conventions") is not None


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_each_docstring_example_is_a_valid_conftest(name: str) -> None:
    """The example pastes into a conftest.py and registers against the spec."""
    code = _example(name)
    module = types.ModuleType(f"example_{name}")
    exec(compile(code, f"<{name} example>", "exec"), module.__dict__)
    manager = pluggy.PluginManager("pytest")
    manager.add_hookspecs(hookspecs)
    manager.register(module)  # pluggy checks the argument names against the spec
    assert [impl.plugin_name for impl in getattr(manager.hook, name).get_hookimpls()]
