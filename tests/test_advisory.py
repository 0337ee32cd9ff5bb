"""Advisory mode: a first run over a legacy zoo records every verdict but fails no test."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.usefixtures("inner_environment")  # runs pytest in-process

TESTS = textwrap.dedent(
    """
    import pytest
    import torch
    from torch import nn

    torch.set_num_threads(1)


    def sigmoid_mlp():
        torch.manual_seed(0)
        layers = []
        for _ in range(12):
            layers += [nn.Linear(8, 8), nn.Sigmoid()]
        return nn.Sequential(*layers)


    def test_fixture(gradcheck):
        report = gradcheck(sigmoid_mlp(), torch.randn(4, 8))
        assert not report.ok


    @pytest.fixture
    def model():
        return sigmoid_mlp()


    @pytest.fixture
    def batch():
        return torch.randn(4, 8)


    @pytest.mark.gradient_health
    def test_automatic(model, batch):
        pass
    """
)
SUITE = textwrap.dedent(
    """
    models:
      sigmoid:
        model: advisory_models:sigmoid_mlp
        batch: {shape: [4, 8]}
    """
)


@pytest.mark.parametrize("how", ["option", "ini"])
@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "n2"])
def test_advisory_mode_records_unhealthy_checks_and_fails_no_test(
    pytester: pytest.Pytester, how: str, xdist: list[str]
) -> None:
    ini = "[pytest]\naddopts = -p no:benchmark\nfilterwarnings = error\ngradcheck_device = cpu\n"
    if how == "ini":
        ini += "gradcheck_advisory = true\n"
    pytester.makeini(ini)
    pytester.makepyfile(test_advisory_inner=TESTS, advisory_models=TESTS)
    pytester.makefile(".yaml", gradcheck_models=SUITE)
    args = [*xdist, "-p", "no:cacheprovider", "--junitxml=out.xml"]
    if how == "option":
        args.append("--gradcheck-advisory")
    run = pytester.runpytest_subprocess if xdist else pytester.runpytest
    result = run(*args)
    result.assert_outcomes(passed=3)
    verdicts = [
        prop.get("value")
        for prop in ET.parse(pytester.path / "out.xml").getroot().iter("property")
        if prop.get("name") == "gradcheck.verdict"
    ]
    assert verdicts == ["unhealthy"] * 3
    # The terminal summary lists them as unhealthy and says why no test failed.
    result.stdout.fnmatch_lines(
        [
            "*= gradcheck =*",
            "unhealthy  *",
            "unhealthy  *",
            "unhealthy  *",
            "advisory mode (--gradcheck-advisory): 3 unhealthy check(s) reported above, "
            "no test failed for them",
        ]
    )


def test_without_advisory_mode_the_same_checks_fail(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:benchmark\ngradcheck_device = cpu\n")
    pytester.makepyfile(test_advisory_inner=TESTS, advisory_models=TESTS)
    pytester.makefile(".yaml", gradcheck_models=SUITE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    result.stdout.no_fnmatch_line("advisory mode*")


def test_advisory_mode_still_fails_a_check_that_cannot_run(pytester: pytest.Pytester) -> None:
    """Advisory mode forgives unhealthy gradients, not a forward that raises."""
    pytester.makeini("[pytest]\naddopts = -p no:benchmark\ngradcheck_device = cpu\n")
    pytester.makepyfile(
        test_broken_forward=textwrap.dedent(
            """
            import torch
            from torch import nn


            class Broken(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.layer = nn.Linear(8, 8)

                def forward(self, x):
                    return self.layer(x.view(3, -1))


            def test_broken(gradcheck):
                gradcheck(Broken(), torch.randn(4, 8))
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--gradcheck-advisory")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the forward pass (model(batch)*raised RuntimeError*"])
