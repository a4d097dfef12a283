"""pytest-benchmark entries for the same ops and providers as `python -m bench` (its setup functions).

    pytest bench/ --benchmark-only                      # CPU: small shapes; GPU: the reference defaults
    pytest bench/ --benchmark-only -k "intl_loss and reference"
On a GPU each call is followed by a synchronize, so the wall-clock time is the device time.
"""
import pytest
import torch

from bench import providers as P
from bench.measure import mode_calls

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    CASES = [P.Case("iternorm", 256, 8192, axis=0), P.Case("iternorm", 256, 1024, axis=1),
             P.Case("intl_loss", 256, 8192, axis=0, k=2), P.Case("trace_loss", 256, 8192, axis=0),
             P.Case("whiten", 512, 256, axis=1)]
else:
    CASES = [P.Case("iternorm", 64, 512, axis=0), P.Case("iternorm", 256, 128, axis=1),
             P.Case("intl_loss", 64, 512, axis=0, k=2), P.Case("trace_loss", 128, 512, axis=0),
             P.Case("whiten", 256, 128, axis=1)]
STATUS = P.provider_status(DEVICE)


def _params():
    for case in CASES:
        for provider in P.providers_for(case.op):
            for mode in P.MODES:
                reason = P.runnable(case, provider, STATUS, DEVICE)
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                yield pytest.param(case.with_mode(mode), provider,
                                   id=f"{case.label().replace(' ', '-')}-{mode}-{provider}", marks=marks)


@pytest.mark.parametrize("case, provider", list(_params()))
def test_bench(benchmark, case, provider):
    xs = P.make_inputs(case, DEVICE)
    call = mode_calls(P.get_forward(case, provider), xs, case.mode)
    if DEVICE.type == "cuda":
        def run():
            call()
            torch.cuda.synchronize()
    else:
        run = call
    run()  # compile / warm up outside the measurement
    benchmark.extra_info.update(case.as_dict(), provider=provider, device=str(DEVICE))
    benchmark(run)
