"""Shared fixtures: deterministic seeds and tiny random Phi-3 models built offline."""
import os

# Triton decides between compiled and interpreted kernels when it is first
# imported (torch.compile tests import it early), so on a machine without CUDA
# the interpreter must be requested before any test module loads.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Keep runs reproducible and the suite fast on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


# The optional libraries a test may compare with or run over; ``--without`` hides them so that a run
# shows which tests need them (those skip) and that every other test passes without them.
ORACLES = ("peft", "loralib", "bitsandbytes", "torchao", "transformers", "triton")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device for the tests marked 'cuda' (tests/test_device.py): cpu (default) or cuda[:N]")
    parser.addoption("--without", default="", metavar="NAMES",
                     help=f"comma-separated optional libraries to hide, as if not installed: any of {', '.join(ORACLES)}")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on the device given by --device (cpu by default)")
    hide_libraries(config.getoption("--without"))


def hide_libraries(names: str) -> None:
    """Make ``import NAME`` fail (and ``importlib.util.find_spec(NAME)`` return None) for each of the
    comma-separated ``names``: a ``None`` entry in ``sys.modules`` is Python's own "not importable" mark,
    so ``pytest.importorskip`` skips and libraries that probe for the package see it missing."""
    hidden = [name.strip() for name in names.split(",") if name.strip()]
    unknown = sorted(set(hidden) - set(ORACLES))
    if unknown:
        raise pytest.UsageError(f"--without: unknown libraries {unknown}; choose from {', '.join(ORACLES)}")
    for name in hidden:
        loaded = [key for key in sys.modules if key == name or key.startswith(name + ".")]
        if loaded:  # too late to hide: something imported it before the tests were collected
            raise pytest.UsageError(f"--without {name}: already imported ({loaded[0]}) before the tests ran")
        sys.modules[name] = None


@pytest.fixture
def device(request):
    """The ``--device`` of this run, as a torch.device; a CUDA one that is missing is an error, not a skip."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"--device {dev}: torch {torch.__version__} sees no CUDA device")
    return dev


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def make_tiny_phi3(gqa: bool = True, seed: int = 0, vocab_size: int = 128, hidden_size: int = 64,
                   num_hidden_layers: int = 2, intermediate_size: int = 96):
    """A small random ``Phi3ForCausalLM`` (fp32, eval mode), built offline.

    ``gqa=True`` gives 4 heads / 2 KV heads; ``gqa=False`` gives MHA (4 / 4).
    """
    transformers = pytest.importorskip("transformers")
    config = transformers.Phi3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config)
    return model.eval()


@pytest.fixture
def tiny_phi3_factory():
    """Returns :func:`make_tiny_phi3`; call it with ``gqa=True/False``."""
    return make_tiny_phi3


@pytest.fixture(scope="module")
def saved_phi3(tmp_path_factory):
    """A folder with a tiny Phi-3 (hidden 64, MLP 128) saved by ``save_pretrained``, for
    :func:`load_quantized_phi3`; skips without bitsandbytes or transformers."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("phi3")
    make_tiny_phi3(hidden_size=64, intermediate_size=128).save_pretrained(folder)
    return folder


def load_quantized_phi3(folder, kind: str):
    """The Phi-3 saved in ``folder`` as transformers loads it with a ``BitsAndBytesConfig`` on CPU, in eval
    mode: ``kind`` is ``"int8"`` (LLM.int8) or a 4-bit quant type (``"nf4"``, ``"fp4"``), computing in fp32."""
    import transformers

    if kind == "int8":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                                 bnb_4bit_compute_dtype=torch.float32)
    return transformers.Phi3ForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                        dtype=torch.float32).eval()


def restored(module, how: str):
    """A copy of ``module`` made the way programs make one: ``"deepcopy"``, ``"pickle"``, or a
    whole-module ``"torch.save"`` / ``"torch.load"`` round trip."""
    import copy
    import io
    import pickle

    if how == "deepcopy":
        return copy.deepcopy(module)
    if how == "pickle":
        return pickle.loads(pickle.dumps(module))
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group, for DDP and FSDP2 wrappers in a single test process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"file://{tmp_path_factory.mktemp('pg')}/pg")
    yield
    dist.destroy_process_group()
