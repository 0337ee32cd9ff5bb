"""Regression tests for the defects of the reliability and security audit (2026-12, turn 2:
bad input, faults, hostile content), one or more per audit case, grouped by outcome class.

Each test states the behaviour the audit asks for, through public entry points only:
``check_gradients``, pytest runs of generated files (pytester, in-process) and the
``gradcheck-report`` command line (``report.main``). Every defect class of the audit is
fixed, so every test passes; a test that fails names the audit case it guards.

Cases that no test here covers are listed at the end of the module.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_gradcheck import GradcheckError, check_gradients
from pytest_gradcheck import report as cli
from pytest_gradcheck.results import GradcheckWarning

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process


# -- helpers ----------------------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def sample() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_intact(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer still on the CPU, with its values bit for bit."""
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in after.items():
        assert value.device.type == "cpu", name
        assert torch.equal(value, before[name]), name


def write_ini(pytester: pytest.Pytester, *lines: str) -> None:
    pytester.makeini(
        "\n".join(
            [
                "[pytest]",
                "addopts = --strict-markers -p no:benchmark -p no:randomly -p no:cacheprovider",
                "filterwarnings =",
                "    error",
                "gradcheck_device = cpu",
                *lines,
            ]
        )
        + "\n"
    )


def output(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


def commands(text: str) -> list[str]:
    """The lines of ``text`` that the GitHub runner reads as workflow commands: ``::`` after
    leading white space, or the legacy ``##[`` anywhere in the line."""
    return [line for line in text.splitlines() if line.lstrip().startswith("::") or "##[" in line]


def cli_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


HEALTHY_TEST = """
import torch
from torch import nn

torch.set_num_threads(1)


def test_ok(gradcheck):
    torch.manual_seed(0)
    gradcheck(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
"""

# A model with one dead layer (multiplied by 0) under a chosen module name: the dead layer is
# the worst layer, so its name reaches the failure text, the summary and the JUnit file.
NAMED_LAYER = """
import pytest
import torch
from torch import nn

torch.set_num_threads(1)


class Named(nn.Module):
    def __init__(self, *names):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.names = names
        for name in names:
            self.add_module(name, nn.Linear(4, 4))
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        for name in self.names:
            h = h + 0.0 * getattr(self, name)(h)  # dead: an exactly-zero gradient
        return self.b(h)
"""

INJECTED = "pwn\n::error file=x,line=1,title=INJECTED::fake failure\n::add-mask::x"
HTML_ID = "q`<img src=https://attacker.example/p.png><a href=https://attacker.example>click</a>"
HTML_LAYER = "`<b>bold-layer</b><img src=x>"


def injected_run(pytester: pytest.Pytester) -> pytest.RunResult:
    """Audit S1/B1: a failing check whose worst layer is named to forge workflow commands,
    and a healthy one; JUnit written in the xunit1 family (file and line)."""
    write_ini(pytester)
    pytester.makepyfile(
        test_inject=NAMED_LAYER
        + f"""

def test_m(gradcheck):
    gradcheck(Named({INJECTED!r}), torch.randn(3, 4))


def test_healthy(gradcheck):
    torch.manual_seed(0)
    gradcheck(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
"""
    )
    result = pytester.runpytest("-o", "junit_family=xunit1", "--junitxml=r.xml")
    result.assert_outcomes(passed=1, failed=1)
    return result


SUITE_FACTORIES = """
import torch
from torch import nn

torch.set_num_threads(1)


def mlp(dummy=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
"""


def suite_error(pytester: pytest.Pytester, text: str) -> str:
    """Run a suite file; it must fail (at collection or in its test) with a message naming
    the file and no traceback. Returns the output."""
    write_ini(pytester)
    pytester.makepyfile(factories=SUITE_FACTORIES)
    pytester.path.joinpath("gradcheck_s.yaml").write_text(text)
    result = pytester.runpytest()
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == 0
    assert outcomes.get("errors", 0) + outcomes.get("failed", 0) == 1
    shown = output(result)
    assert "gradcheck_s.yaml" in shown
    assert "INTERNALERROR" not in shown
    assert "Traceback" not in shown
    # No traceback frames in the plugin or in PyYAML: the message alone says what is wrong.
    assert not re.search(r"pytest_gradcheck[/\\]\w+\.py:\d+", shown)
    assert not re.search(r"[/\\]yaml[/\\]\w+\.py", shown)
    return shown


# == exploitable ==============================================================================


def test_exploitable_B1_pytest_output_forges_no_workflow_command(
    pytester: pytest.Pytester,
) -> None:
    result = injected_run(pytester)
    assert "gradcheck" in "\n".join(result.outlines)  # the plugin's summary section ran
    assert commands("\n".join(result.outlines)) == []


def test_exploitable_S1_legacy_command_prefix_in_a_module_name(
    pytester: pytest.Pytester,
) -> None:
    """Beyond the audit's probe: the runner also reads ``##[command]`` anywhere in a line
    (its legacy form), so a name needs no line break to forge a command."""
    write_ini(pytester)
    pytester.makepyfile(
        test_legacy=NAMED_LAYER
        + """

def test_m(gradcheck):
    gradcheck(Named("x " + "#" * 2 + "[error]forged"), torch.randn(3, 4))
"""
    )
    result = pytester.runpytest("-o", "junit_family=xunit1", "--junitxml=r.xml")
    result.assert_outcomes(failed=1)
    assert commands("\n".join(result.outlines)) == []


def test_exploitable_B3_report_summary_forges_no_workflow_command(
    pytester: pytest.Pytester,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    injected_run(pytester)
    status, out, _ = cli_run(capsys, "summary", "r.xml")
    assert status == 1
    assert commands(out) == []

    step = pytester.path / "step.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    status, out, _ = cli_run(capsys, "summary", "r.xml", "--github")
    assert status == 1
    # Only the gate's own annotations: one ::error per failing check, escaped (B4).
    found = commands(out)
    assert len(found) == 1
    assert found[0].startswith("::error file=test_inject.py,line=")
    assert "INJECTED" in found[0]  # the name, escaped inside the gate's own command
    assert step.read_text(encoding="utf-8").count("\n") > 3


def test_handled_B4_annotation_messages_stay_escaped(pytester: pytest.Pytester) -> None:
    """B4 (handled): the ::error annotations themselves escape names (%0A, %3A, %2C)."""
    injected_run(pytester)
    results = cli.read_results([pytester.path / "r.xml"], pytester.path)
    annotations = cli.github_annotations(results)
    assert len(annotations) == 1
    assert "\n" not in annotations[0]
    assert "\r" not in annotations[0]
    empty, properties, data = annotations[0].split("::", 2)
    assert empty == ""
    assert properties.startswith("error file=test_inject.py,line=")
    assert ":" not in properties.split(",title=", 1)[1]  # escaped as %3A
    assert "INJECTED" in data


def test_exploitable_B5_step_summary_holds_no_raw_html(
    pytester: pytest.Pytester,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_ini(pytester)
    pytester.makepyfile(
        test_html=NAMED_LAYER
        + f"""

@pytest.mark.parametrize("v", [0], ids=[{HTML_ID!r}])
def test_q(gradcheck, v):
    gradcheck(Named({HTML_LAYER!r}), torch.randn(3, 4))


@pytest.mark.parametrize("v", [0], ids=["ok<img src=x>"])
def test_healthy(gradcheck, v):
    torch.manual_seed(0)
    gradcheck(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
"""
    )
    pytester.runpytest("--junitxml=r.xml").assert_outcomes(passed=1, failed=1)
    step = pytester.path / "step.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    status, _, _ = cli_run(capsys, "summary", "r.xml", "--github")
    assert status == 1
    markdown = step.read_text(encoding="utf-8")
    assert "bold-layer" in markdown  # the names are there, escaped
    assert "attacker.example" in markdown
    for tag in ("<img", "<a ", "<b>", "</a>"):
        assert tag not in markdown, tag


def test_exploitable_Y35_extends_outside_the_rootdir_is_refused(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside") / "org.yaml"
    outside.write_text("settings:\n  seed: 1\n")  # a valid policy: only its place is wrong
    write_ini(pytester)
    pytester.makepyfile(test_ok=HEALTHY_TEST)
    relative = os.path.relpath(outside, pytester.path)
    assert relative.startswith("..")
    pytester.makefile(".yaml", p=f"extends: {relative}\n")
    result = pytester.runpytest("--gradcheck-policy=p.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "extends" in output(result)
    assert "INTERNALERROR" not in output(result)


def test_exploitable_Y35_an_error_does_not_echo_the_extended_file(
    pytester: pytest.Pytester,
) -> None:
    markers = [f"secret{i:03d}x" for i in range(100)]
    pytester.path.joinpath("notes.txt").write_text("\n".join(markers) + "\n")  # a plain string
    write_ini(pytester)
    pytester.makepyfile(test_ok=HEALTHY_TEST)
    pytester.makefile(".yaml", p="extends: notes.txt\n")
    result = pytester.runpytest("--gradcheck-policy=p.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    shown = output(result)
    assert "notes.txt" in shown
    assert sum(marker in shown for marker in markers) <= 8  # an excerpt at most
    assert "secret099x" not in shown


def test_exploitable_Y20_a_suite_does_not_call_a_non_module_callable(
    pytester: pytest.Pytester,
) -> None:
    """The audit's fix is documentation, optionally refusing a ``model:`` that is not a
    Module class (or annotated to return one) before calling it: this test asks for that."""
    write_ini(pytester)
    pytester.makefile(
        ".yaml",
        gradcheck_s="""
models:
  m:
    model: os:mkdir
    args: {path: PWNED}
    batch: {shape: [3, 4]}
""",
    )
    result = pytester.runpytest()
    assert not (pytester.path / "PWNED").exists()
    assert result.ret != pytest.ExitCode.OK
    assert "os:mkdir" in output(result)


# == data-changed =============================================================================


def test_data_changed_A27_meta_device_is_refused_and_the_model_kept() -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(GradcheckError, match="meta"):
        check_gradients(model, sample(), device="meta")
    assert_intact(model, before)


def test_data_changed_A27b_meta_device_option_keeps_a_shared_model(
    pytester: pytest.Pytester,
) -> None:
    write_ini(pytester)
    pytester.makepyfile(
        test_shared="""
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
SAVED = {k: v.clone() for k, v in MODEL.state_dict().items()}


def test_a(gradcheck):
    gradcheck(MODEL, torch.randn(3, 4))


def test_b():
    for name, value in MODEL.state_dict().items():
        assert value.device.type == "cpu", name
        assert torch.equal(value, SAVED[name]), name
"""
    )
    result = pytester.runpytest("--gradcheck-device=meta")
    shown = output(result)
    assert "meta" in shown
    assert "INTERNALERROR" not in shown
    if result.ret == pytest.ExitCode.USAGE_ERROR:  # refused at startup
        return
    result.assert_outcomes(passed=1, failed=1)
    assert "GradcheckError" in shown
    assert "NotImplementedError" not in shown


@pytest.mark.parametrize(
    ("steps", "existing"),
    [
        pytest.param(1, False, id="D06-none-stays-none"),
        pytest.param(
            1,
            True,
            id="D06b-existing-grad-kept",
        ),
        pytest.param(3, False, id="D06c-steps-3"),
    ],
)
def test_data_changed_D06_batch_grad_is_left_alone(steps: int, existing: bool) -> None:
    batch = sample().requires_grad_()
    grad = torch.full_like(batch, 0.5) if existing else None
    batch.grad = grad
    report = check_gradients(mlp(), batch, steps=steps)
    assert report.ok
    if grad is None:
        assert batch.grad is None
    else:
        assert batch.grad is grad
        assert torch.equal(batch.grad, torch.full_like(batch, 0.5))


def test_data_changed_D07_a_graph_built_before_a_steps_2_check_still_backwards() -> None:
    model = mlp()
    loss = model(sample()).pow(2).sum()
    check_gradients(model, sample(), steps=2)
    loss.backward()  # RuntimeError today: "modified by an inplace operation"
    assert all(p.grad is not None for p in model.parameters())


def test_handled_D07b_a_graph_built_before_a_steps_1_check_still_backwards() -> None:
    model = mlp()
    loss = model(sample()).pow(2).sum()
    check_gradients(model, sample(), steps=1)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_data_changed_D07c_an_eval_batchnorm_graph_still_backwards() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.eval()
    loss = model(sample()).pow(2).sum()
    check_gradients(model, sample(), steps=1)
    loss.backward()
    assert model[1].weight.grad is not None


class ClampsItself(nn.Module):
    """A forward that changes its own weight in place (a constraint applied in forward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.inner.weight.clamp_(-0.05, 0.05)
        out: torch.Tensor = self.head(self.inner(x))
        return out


def test_data_changed_D08_a_forward_that_clamps_its_weights_is_said_or_undone() -> None:
    """A one-pass check runs on the model's own parameters (a copy of every weight per check
    would cost what the check costs): it says that the forward changed them. From two steps
    on the check runs on copies, and the weights are as before."""
    model = ClampsItself()
    before = snapshot(model)
    assert before["inner.weight"].abs().max() > 0.05  # the clamp would change it
    with pytest.warns(GradcheckWarning, match="forward changed 1 of its parameters in place"):
        check_gradients(model, sample())
    model = ClampsItself()
    before = snapshot(model)
    check_gradients(model, sample(), steps=2)
    assert_intact(model, before)


class TwoCallers(nn.Module):
    """Forces two checks of one model from two threads to overlap, the second to finish last:
    the first waits (at most 2 s) in its forward until the second is in its forward, and the
    second waits there until the first check has returned. Today the handshake takes
    milliseconds; a check that serialises or refuses the second caller pays the timeout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)
        self.roles: dict[int, str] = {}
        self.first_in = threading.Event()
        self.second_in = threading.Event()
        self.first_done = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        role = self.roles.get(threading.get_ident())
        if role == "first":
            self.first_in.set()
            self.second_in.wait(2)
        elif role == "second":
            self.second_in.set()
            self.first_done.wait(2)
        out: torch.Tensor = self.b(torch.relu(self.a(x)))
        return out


def test_data_changed_D11_concurrent_checks_leave_the_model_as_before() -> None:
    model = TwoCallers().eval()
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    grads = [param.grad for param in model.parameters()]
    before = snapshot(model)
    outcomes: list[object] = []

    def run(role: str) -> None:
        model.roles[threading.get_ident()] = role
        try:
            outcomes.append(check_gradients(model, sample(), steps=2))
        except GradcheckError as exc:  # refusing the second caller is fine
            outcomes.append(exc)
        finally:
            if role == "first":
                model.first_done.set()

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert model.first_in.wait(5)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    first.join(10)
    second.join(10)
    assert len(outcomes) == 2
    assert not any(module.training for module in model.modules())
    assert all(param.grad is grad for param, grad in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads if g is not None)
    assert_intact(model, before)


# == hang =====================================================================================


class StopsAfter(nn.Module):
    """A forward that counts its calls and stops the check (a BaseException, which the engine
    lets through) after ``limit`` of them: a run that should have been refused ends fast."""

    class Stop(BaseException):
        pass

    def __init__(self, limit: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)
        self.calls = 0
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.limit:
            raise StopsAfter.Stop(f"forward called {self.calls} times")
        out: torch.Tensor = self.b(torch.relu(self.a(x)))
        return out


def test_hang_A42_a_huge_steps_is_refused_naming_a_bound() -> None:
    model = StopsAfter()
    with pytest.raises(GradcheckError) as error:
        check_gradients(model, sample(), steps=10**9)
    message = str(error.value)
    assert "steps" in message
    assert re.search(r"at most|<=|no more than|maximum|bound|limit", message)
    assert model.calls == 0  # refused before anything ran


def bomb(levels: int) -> str:
    """YAML whose aliases expand to 10**levels leaves (under ``args:``, where the suite
    loader copies them)."""
    lines = ["        a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"        a{level}: &a{level} [{refs}]")
    return "\n".join(lines)


def test_hang_Y22_an_alias_bomb_in_args_is_refused(pytester: pytest.Pytester) -> None:
    # 10**6 leaves from a file of under 1 KB (the audit's 10**8 took 30 s and 2.5 GB).
    text = f"""
models:
  m:
    model: factories:mlp
    args:
      dummy:
{bomb(6)}
    batch: {{shape: [3, 4]}}
"""
    assert len(text) < 1024
    suite_error(pytester, text)


def test_hang_Y38_a_catastrophic_policy_regex_is_refused(pytester: pytest.Pytester) -> None:
    """The name has 24 characters, so today's run still ends (in well under a second); at
    29 characters the audit measured 9.8 s, and each one more doubles it. The rule must be
    refused (or matched by an engine without backtracking; then adapt this test)."""
    write_ini(pytester)
    pytester.makepyfile(
        test_regex=NAMED_LAYER
        + """

def test_m(gradcheck):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model.add_module("a" * 23 + "!", nn.Linear(2, 2))  # in the forward path: checked
    gradcheck(model, torch.randn(3, 4))
"""
    )
    pytester.makefile(".yaml", p="rules:\n  - match: 're:(a+)+$'\n    ignore: true\n")
    result = pytester.runpytest("--gradcheck-policy=p.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "(a+)+$" in output(result)
    assert "INTERNALERROR" not in output(result)


def test_handled_Y39_an_invalid_policy_regex_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """Y39 (handled), the control for Y38: how a refused rule reads."""
    write_ini(pytester)
    pytester.makepyfile(test_ok=HEALTHY_TEST)
    pytester.makefile(".yaml", p="rules:\n  - match: 're:(['\n    ignore: true\n")
    result = pytester.runpytest("--gradcheck-policy=p.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "p.yaml:2: invalid regular expression '(['" in output(result)
    assert "INTERNALERROR" not in output(result)


# == crash ====================================================================================


def test_crash_Y42_a_raising_conventions_hook_is_a_usage_error(
    pytester: pytest.Pytester,
) -> None:
    write_ini(pytester)
    pytester.makeconftest(
        """
def pytest_gradcheck_conventions():
    raise ValueError("bug in my conventions hook")
"""
    )
    pytester.makepyfile(test_ok=HEALTHY_TEST)
    pytester.makefile(".yaml", p="settings:\n  seed: 1\n")
    result = pytester.runpytest("--gradcheck-policy=p.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    shown = output(result)
    assert "INTERNALERROR" not in shown
    assert "bug in my conventions hook" in shown


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("direct", id="Y44-nul-in-the-policy"),
        pytest.param("extends", id="Y47-extends-a-nul-file"),
    ],
)
def test_crash_Y44_Y47_a_nul_byte_in_a_policy_is_a_usage_error(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, how: str
) -> None:
    write_ini(pytester)
    pytester.makepyfile(test_ok=HEALTHY_TEST)
    nul = "settings:\n  seed: 1\x00\n"
    if how == "direct":
        pytester.path.joinpath("p.yaml").write_text(nul)
        named = "p.yaml"
    else:
        target = tmp_path_factory.mktemp("nul") / "environ.yaml"
        target.write_text(nul)
        pytester.path.joinpath("p.yaml").write_text(f"extends: {target}\n")  # absolute
        named = "environ.yaml"
    result = pytester.runpytest("--gradcheck-policy=p.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    shown = output(result)
    assert "INTERNALERROR" not in shown
    assert named in shown


# == silent-wrong =============================================================================


def test_silent_wrong_A12_an_empty_batch_is_refused() -> None:
    with pytest.raises(GradcheckError, match=r"(?i)empty|0 samples|no samples"):
        check_gradients(mlp(), torch.randn(0, 4))


def test_silent_wrong_A31_an_infinite_lr_is_refused() -> None:
    with pytest.raises(GradcheckError, match="lr"):
        check_gradients(mlp(), sample(), steps=3, lr=math.inf)


def test_handled_A24_a_nan_lr_is_refused() -> None:
    """The twin of A31 that already works: lr=nan names the setting."""
    with pytest.raises(GradcheckError, match=r"lr=nan .*lr must be a number"):
        check_gradients(mlp(), sample(), steps=3, lr=math.nan)


def test_silent_wrong_Y28_an_entry_name_with_a_trailing_newline_is_refused(
    pytester: pytest.Pytester,
) -> None:
    text = 'models:\n  "ok\\n":\n    model: factories:mlp\n    batch: {shape: [3, 4]}\n'
    assert "ok\\n" in text  # a YAML escape: the key is 'ok' and a newline
    shown = suite_error(pytester, text)
    assert "entry name" in shown


def test_handled_Y27_an_entry_name_with_spaces_gives_a_clear_error(
    pytester: pytest.Pytester,
) -> None:
    """Y27 (handled), the control for Y28 and for ``suite_error``'s bar: a clear error."""
    text = 'models:\n  "a::b c":\n    model: factories:mlp\n    batch: {shape: [3, 4]}\n'
    shown = suite_error(pytester, text)
    assert "gradcheck_s.yaml:2: entry 'a::b c': an entry name becomes the test id" in shown


def junit(cases: list[str]) -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="pytest" '
        f'tests="{len(cases)}">' + "".join(cases) + "</testsuite></testsuites>\n"
    )


def junit_case(name: str, verdict: str, failed: bool = False, worst: str = "0") -> str:
    props = {
        "gradcheck.verdict": verdict,
        "gradcheck.problems": "" if verdict == "healthy" else f"vanishing:{worst}",
        "gradcheck.worst_layer": worst,
        "gradcheck.min_grad_norm": "1.2e-07",
        "gradcheck.max_grad_norm": "0.53",
    }
    body = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props.items())
    failure = '<failure message="GradientHealthError: boom">boom</failure>' if failed else ""
    return (
        f'<testcase classname="test_big" name="{name}" time="0.01">'
        f"<properties>{body}</properties>{failure}</testcase>"
    )


def test_silent_wrong_R07b_a_huge_step_summary_is_truncated_with_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    count = 3000
    cases = [junit_case(f"test_x[{'p' * 400}-{i}]", "healthy") for i in range(count)]
    cases.append(junit_case("test_bad", "unhealthy", failed=True))
    (tmp_path / "big.xml").write_text(junit(cases))
    step = tmp_path / "step.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    status, _, _ = cli_run(capsys, "summary", "big.xml", "--github")
    assert status == 1
    markdown = step.read_text(encoding="utf-8")
    assert len(markdown.encode("utf-8")) <= 1024 * 1024
    assert "test_bad" in markdown  # the failing check is kept
    assert re.search(r"\d+[^\n]*(not shown|left out|omitted|truncated|more)", markdown)


def test_silent_wrong_R11_an_unknown_verdict_is_not_counted_as_fine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.xml").write_text(junit([junit_case("test_w", "weird-verdict")]))
    status, out, err = cli_run(capsys, "summary", "w.xml")
    assert status != 0
    assert "weird-verdict" in out + err


def baseline_json(norm: str) -> str:
    return (
        '{"format": "pytest-gradcheck baseline", "version": 1, "checks": {\n'
        f'  "test_m.py::test_m": {{"0": {norm}, "2": {norm}}}\n}}}}\n'
    )


@pytest.mark.parametrize(
    "norm",
    [
        pytest.param("NaN", id="R17-nan"),
        pytest.param(
            "Infinity",
            id="R18-infinity",
        ),
    ],
)
def test_silent_wrong_R17_R18_a_baseline_with_non_finite_norms_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, norm: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.json").write_text(baseline_json(norm))
    (tmp_path / "new.json").write_text(baseline_json("1000.0"))
    old = json.loads(baseline_json(norm))["checks"]["test_m.py::test_m"]["0"]
    assert not math.isfinite(old)
    status, _, err = cli_run(capsys, "diff", "old.json", "new.json")
    assert status == 2
    assert "old.json" in err


@pytest.mark.parametrize(
    "norm",
    [
        pytest.param("NaN", id="BL04-nan"),
        pytest.param(
            "Infinity",
            id="BL04-infinity",
        ),
    ],
)
def test_silent_wrong_BL04_gradcheck_baseline_with_non_finite_norms_is_refused(
    pytester: pytest.Pytester, norm: str
) -> None:
    write_ini(pytester)
    pytester.makepyfile(
        test_m="""
import torch
from torch import nn

torch.set_num_threads(1)


def test_m(gradcheck):
    torch.manual_seed(0)
    gradcheck(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
"""
    )
    pytester.path.joinpath("b.json").write_text(baseline_json(norm))
    result = pytester.runpytest("--gradcheck-baseline=b.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "b.json" in output(result)


def test_silent_wrong_B6_names_with_separators_keep_the_problem_count(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ini(pytester)
    pytester.makepyfile(
        test_sep=NAMED_LAYER
        + """

def test_m(gradcheck):
    gradcheck(Named("x,dead:fake_layer", "y:z"), torch.randn(3, 4))
"""
    )
    pytester.runpytest("--junitxml=r.xml").assert_outcomes(failed=1)
    status, out, _ = cli_run(capsys, "summary", "r.xml")
    assert status == 1
    row = next(line for line in out.splitlines() if line.startswith("unhealthy"))
    assert re.split(r"\s{2,}", row)[2] == "dead x2"


# == unclear-error ============================================================================


@pytest.mark.parametrize(
    ("model_meta", "batch_meta"),
    [
        pytest.param(False, True, id="A11-meta-batch"),
        pytest.param(True, False, id="D03-meta-model"),
        pytest.param(True, True, id="D03b-both-meta"),
    ],
)
def test_unclear_A11_D03_meta_tensors_give_a_gradcheck_error(
    model_meta: bool, batch_meta: bool
) -> None:
    model = mlp()
    batch = sample()
    if model_meta:
        model = model.to("meta")
    if batch_meta:
        batch = batch.to("meta")
    before = None if model_meta else snapshot(model)
    with pytest.raises(GradcheckError, match="meta"):
        check_gradients(model, batch)
    if before is not None:
        assert_intact(model, before)


def test_unclear_A29_a_seed_out_of_range_gives_a_gradcheck_error() -> None:
    with pytest.raises(GradcheckError, match="seed"):
        check_gradients(mlp(), sample(), seed=2**70)


def test_handled_A28_a_negative_seed_is_accepted() -> None:
    assert check_gradients(mlp(), sample(), seed=-5).ok


def test_unclear_A44_settings_as_a_dict_gives_a_gradcheck_error() -> None:
    with pytest.raises(GradcheckError, match="settings"):
        check_gradients(mlp(), sample(), settings={"max_norm": 1e3})  # type: ignore[arg-type]


@pytest.mark.skipif(
    hasattr(torch, "xpu") and torch.xpu.is_available(), reason="an XPU is available here"
)
def test_unclear_A45_xpu_without_an_xpu_gives_a_gradcheck_error() -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(GradcheckError, match="xpu"):
        check_gradients(model, sample(), device="xpu")
    assert_intact(model, before)


def test_unclear_Y23_deeply_nested_yaml_gives_a_clear_error(pytester: pytest.Pytester) -> None:
    depth = 50_000
    shown = suite_error(
        pytester,
        f"description: {'[' * depth}{']' * depth}\n"
        "models:\n  m:\n    model: factories:mlp\n    batch: {shape: [3, 4]}\n",
    )
    assert "RecursionError" not in shown


def test_unclear_Y24_an_impossible_shape_gives_a_clear_error(pytester: pytest.Pytester) -> None:
    shown = suite_error(
        pytester,
        "models:\n  m:\n    model: factories:mlp\n    batch: {shape: [100000, 100000, 100000]}\n",
    )
    assert "shape" in shown
    assert "alloc_cpu" not in shown


def test_unclear_Y43_a_control_character_in_a_suite_gives_a_clear_error(
    pytester: pytest.Pytester,
) -> None:
    shown = suite_error(
        pytester,
        "description: a\x1bb\nmodels:\n  m:\n    model: factories:mlp\n"
        "    batch: {shape: [3, 4]}\n",
    )
    assert re.search(r"gradcheck_s\.yaml:\d+", shown)


def test_unclear_Y46_a_suite_policy_with_nul_bytes_gives_a_clear_error(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    target = tmp_path_factory.mktemp("nul") / "environ.yaml"
    target.write_text("settings:\n  seed: 1\x00\n")
    shown = suite_error(
        pytester,
        f"policy: {target}\nmodels:\n  m:\n    model: factories:mlp\n"
        "    batch: {shape: [3, 4]}\n",
    )
    assert "environ.yaml" in shown


def minimal_junit(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text(junit([junit_case("test_a", "healthy")]))


def test_unclear_R09_merge_into_a_directory_gives_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    minimal_junit(tmp_path)
    (tmp_path / "outdir").mkdir()
    status, _, err = cli_run(capsys, "merge", "a.xml", "-o", "outdir")
    assert status == 2
    assert err.startswith("gradcheck-report: error: ")
    assert "outdir" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.xml", "outdir"]  # no .tmp left


def test_unclear_R23_deeply_nested_baseline_json_gives_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep.json").write_text("[" * 100_000)
    status, _, err = cli_run(capsys, "diff", "deep.json", "deep.json")
    assert status == 2
    assert err.startswith("gradcheck-report: error: deep.json")


def test_unclear_BL08_saving_a_baseline_to_a_directory_gives_a_clear_error(
    pytester: pytest.Pytester,
) -> None:
    write_ini(pytester)
    pytester.makepyfile(test_ok=HEALTHY_TEST)
    pytester.mkdir("d")
    result = pytester.runpytest("--gradcheck-save-baseline=d")
    shown = output(result)
    assert result.ret != pytest.ExitCode.OK  # the baseline was not saved: say so
    assert "--gradcheck-save-baseline" in shown
    assert "Traceback" not in shown
    assert "INTERNALERROR" not in shown
    assert not [p for p in pytester.path.rglob("*.tmp")]
    assert not any((pytester.path / "d").iterdir())


# Not turned into tests (see the module docstring):
#
# - C03 (a segfault in a forward kills an in-process run) is inherent to running the model in
#   the pytest process; under -n 2 it is reported as a crashed worker (C01, handled).
# - C05 is pytest-timeout's thread method, which ends the whole run by design.
# - C06 (a forward that never returns): the plugin's own `timeout` is looked at between passes
#   and cannot interrupt it; pytest-timeout's signal method does, with and without xdist
#   (C04/C07): tests/test_timeout.py runs both, and the timeout setting itself.
# - P21 (a misspelt argument in a conftest's hook implementation): pluggy validates it while
#   pytest registers the conftest, before any code of the plugin runs, and pytest prints the
#   traceback; the audit asks for nothing the plugin could do.
