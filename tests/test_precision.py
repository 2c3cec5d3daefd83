"""conventions.float32_products and the precision reads, over PyTorch's two
sets of TF32 switches (the legacy ones and the fp32_precision ones)."""
import pytest
import torch

from gunn_ext import conventions

pytestmark = pytest.mark.skipif(conventions._fp32_switches() is None,
                                reason="this torch has no fp32_precision switches")


@pytest.fixture
def switches():
    """Every switch back to its value after the test."""
    saved = [s.fp32_precision for s in conventions._fp32_switches()]
    yield torch.backends
    for s, value in zip(conventions._fp32_switches(), saved):
        s.fp32_precision = value


@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
@pytest.mark.parametrize("setting", ["legacy", "generic_tf32", "generic_ieee", "mixed"])
def test_float32_products_decides_and_restores(switches, setting, tf32):
    """Inside, every product in the precision asked for and the legacy getters
    readable (torch.compile reads them), whatever the switches above cuBLAS and
    cuDNN say; after, every switch as it was, "none" (inherit) included."""
    if setting == "legacy":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = False
    elif setting == "mixed":
        switches.cuda.matmul.fp32_precision, switches.cudnn.conv.fp32_precision = "tf32", "ieee"
    else:
        for s in conventions._fp32_switches():
            s.fp32_precision = "none"
        switches.fp32_precision = setting.split("_")[1]
    before = [s.fp32_precision for s in conventions._fp32_switches()], conventions.precision_state()
    with conventions.float32_products(tf32):
        assert conventions.precision_state() == (("tf32",) * 2 if tf32 else ("ieee",) * 2)
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
        assert torch.backends.cudnn.allow_tf32 is tf32
    assert ([s.fp32_precision for s in conventions._fp32_switches()], conventions.precision_state()) == before


def test_precision_state_follows_inheritance(switches):
    for s in conventions._fp32_switches():
        s.fp32_precision = "none"
    assert conventions.precision_state() == ("ieee", "ieee")
    switches.fp32_precision = "tf32"
    assert conventions.precision_state() == ("tf32", "tf32") and conventions.matmul_tf32()
    switches.cudnn.conv.fp32_precision = "ieee"
    assert conventions.precision_state() == ("tf32", "ieee")
    switches.fp32_precision = "bf16"  # no bfloat16 float32 mode on CUDA: IEEE there
    assert conventions.precision_state() == ("ieee", "ieee") and not conventions.matmul_tf32()
