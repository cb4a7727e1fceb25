"""The compiled multimodal embedding gather against the torch reference, and its build.

Every comparison runs on the CPU extension (the CUDA kernel's per-token code —
`gather_index.h`, `gather_row.h` — compiled for the host) and, with a GPU, on the CUDA
kernel itself: same inputs, bit-identical outputs, the same exception and message for
every bad ID. Without `nvcc` the kernel's compile tests skip saying so; without a GPU
the CUDA runs skip saying so.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import sysconfig
import types
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from cuda_ext import build
from cuda_ext.gather import ops
from cuda_ext.gather.ops import (
    multimodal_embedding,
    multimodal_embedding_kernel,
    set_embedding_gather,
)
from cuda_ext.gather.reference import multimodal_embedding_reference
from shared.config.errors import InvalidInput
from shared.config.settings import Settings
from shared.config.switch import Switch
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE

CSRC = build.EXTENSIONS["gather_cuda"].csrc
V = 50
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 16-byte rows in every dtype (pure vector copy), odd sizes (scalar tail, and every other
# row misaligned), and a realistic LM width.
HIDDEN = [8, 7, 13, 576]

NEEDS_GPU = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the CUDA kernel is compared with the reference on CUDA tensors")]
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_GPU)]


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> str:
    """A device whose gather extension is built (once per machine, cached; see cuda_ext.build)."""
    kernel(request.param)
    return request.param


@pytest.fixture
def gather_mode():
    """Set the dispatcher's mode for one test, restored afterwards."""
    previous = ops.embedding_gather()
    yield set_embedding_gather
    set_embedding_gather(previous)


def kernel(device: str) -> build.Gather:
    """The compiled gather for `device`; skips the test where the toolchain is missing (a failed build fails it)."""
    try:
        return build.cuda_gather() if device == "cuda" else build.cpu_gather()
    except build.ToolchainMissing as error:
        pytest.skip(f"toolchain not found: {error}")


def random_case(seed: int, hidden: int, dtype: torch.dtype, device: str):
    """Several containers with gaps (or none) between their ranges; a prompt with text and every range's first and last ID."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, hidden, generator=g).to(device, dtype)
    ranges, first = [], BASE + int(torch.randint(0, 5, (1,), generator=g))
    for _ in range(int(torch.randint(2, 6, (1,), generator=g))):
        count = int(torch.randint(1, 9, (1,), generator=g))
        ranges.append((first, count))
        first += count + int(torch.randint(0, 4, (1,), generator=g))  # 0: adjacent ranges
    rows = torch.randn(sum(c for _, c in ranges), hidden, generator=g).to(device, dtype)
    ids = torch.randint(0, V, (16,), generator=g).tolist() + [0, V - 1]
    for first, count in ranges:
        ids += [first, first + count - 1, first + int(torch.randint(0, count, (1,), generator=g))]
    ids = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
    return torch.tensor(ids, device=device), table, torch.tensor(ranges, device=device), rows


def outside_ids(ranges: torch.Tensor) -> list[int]:
    """IDs at or above the base next to every range but in none: first − 1 and last + 1 where free."""
    spans = [(int(f), int(f) + int(c)) for f, c in ranges.tolist()]
    edges = {f - 1 for f, _ in spans} | {end for _, end in spans}
    return sorted(i for i in edges if i >= BASE and not any(f <= i < end for f, end in spans))


def raised(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


# -- the kernel's code against the reference -----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_random_prompts_match_the_reference_bit_for_bit(device, dtype, hidden):
    for seed in range(3):
        ids, table, ranges, rows = random_case(seed, hidden, dtype, device)
        out = multimodal_embedding_kernel(kernel(device), ids, table, ranges, rows)
        assert out.dtype == dtype and out.device.type == device
        assert torch.equal(out, multimodal_embedding_reference(ids, table, ranges, rows))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_inputs_are_copied_word_by_word(device, dtype):
    ids, table, ranges, rows = random_case(0, 64, dtype, device)
    # Views one element into their storage: no row starts on 16 bytes, so no vector load is legal.
    table = torch.cat([table.new_zeros(1), table.flatten()])[1:].view(table.shape)
    rows = torch.cat([rows.new_zeros(1), rows.flatten()])[1:].view(rows.shape)
    assert table.data_ptr() % 16 and rows.data_ptr() % 16
    out = multimodal_embedding_kernel(kernel(device), ids, table, ranges, rows)
    assert torch.equal(out, multimodal_embedding_reference(ids, table, ranges, rows))


def test_ids_just_outside_every_range_raise_the_reference_error(device):
    for seed in range(4):
        ids, table, ranges, rows = random_case(seed, 8, torch.float32, device)
        forged_ids = outside_ids(ranges)
        assert forged_ids  # the last range's end is always free
        for forged in forged_ids:
            prompt = torch.cat([ids, torch.tensor([forged], device=device), ids])
            expected = raised(lambda: multimodal_embedding_reference(prompt, table, ranges, rows))
            assert expected[0] is InvalidInput and str(forged) in expected[1]
            assert raised(lambda: multimodal_embedding_kernel(kernel(device), prompt, table, ranges, rows)) == expected


@pytest.mark.parametrize("bad", [-1, -(2**40), V, BASE - 1], ids=["minus1", "very_negative", "vocab", "base_minus1"])
def test_text_ids_outside_the_vocabulary_raise_the_reference_error(device, bad):
    ids, table, ranges, rows = random_case(0, 8, torch.float32, device)
    prompt = torch.cat([ids[:5], torch.tensor([bad], device=device), ids[5:]])
    expected = raised(lambda: multimodal_embedding_reference(prompt, table, ranges, rows))
    assert expected == (InvalidInput, f"token id {bad} is outside the vocabulary [0, {V}) and is no embedding id")
    assert raised(lambda: multimodal_embedding_kernel(kernel(device), prompt, table, ranges, rows)) == expected


def test_the_first_offending_token_is_named_text_errors_first(device):
    ids, table, ranges, rows = random_case(1, 8, torch.float32, device)
    unbound = outside_ids(ranges)[-1]
    # The reference names the first bad text ID even after an unbound one; else the first unbound one.
    for bad, named in [([unbound, V + 2, V + 1], V + 2), ([unbound + 1, unbound], unbound + 1)]:
        prompt = torch.cat([ids, torch.tensor(bad, device=device)])
        expected = raised(lambda: multimodal_embedding_reference(prompt, table, ranges, rows))
        assert f"token id {named} " in expected[1]
        assert raised(lambda: multimodal_embedding_kernel(kernel(device), prompt, table, ranges, rows)) == expected


def test_a_long_prompt_names_its_first_offender(device):
    ids, table, ranges, rows = random_case(2, 576, torch.float32, device)
    prompt = ids.repeat(400)  # 10k+ tokens: on CUDA as many blocks, racing to report an offender
    expected_out = multimodal_embedding_reference(prompt, table, ranges, rows)
    assert torch.equal(multimodal_embedding_kernel(kernel(device), prompt, table, ranges, rows), expected_out)
    forged = outside_ids(ranges)[0]
    prompt[[7000, 9000, 3000]] = forged
    expected = raised(lambda: multimodal_embedding_reference(prompt, table, ranges, rows))
    assert raised(lambda: multimodal_embedding_kernel(kernel(device), prompt, table, ranges, rows)) == expected


def test_empty_prompt(device):
    _, table, ranges, rows = random_case(0, 8, torch.float32, device)
    out = multimodal_embedding_kernel(kernel(device), torch.empty(0, dtype=torch.long, device=device), table, ranges, rows)
    assert out.shape == (0, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_image_prompt_returns_the_rows(device, dtype):
    _, table, ranges, rows = random_case(3, 13, dtype, device)
    ids = torch.tensor([f + i for f, c in ranges.tolist() for i in range(c)], device=device)
    assert torch.equal(multimodal_embedding_kernel(kernel(device), ids, table, ranges, rows), rows)


def test_no_containers(device):
    table = torch.randn(V, 8, device=device)
    ranges, rows = torch.empty(0, 2, dtype=torch.long, device=device), torch.empty(0, 8, device=device)
    ids = torch.tensor([0, 5, V - 1], device=device)
    assert torch.equal(multimodal_embedding_kernel(kernel(device), ids, table, ranges, rows), table[ids])
    forged = torch.tensor([1, BASE + 7], device=device)
    expected = raised(lambda: multimodal_embedding_reference(forged, table, ranges, rows))
    assert raised(lambda: multimodal_embedding_kernel(kernel(device), forged, table, ranges, rows)) == expected


def test_rows_are_cast_to_the_table_dtype_like_the_reference(device):
    ids, table, ranges, rows = random_case(4, 13, torch.bfloat16, device)
    rows = rows.float() + 1e-3  # not representable in bfloat16: the cast must round the same way
    out = multimodal_embedding_kernel(kernel(device), ids, table, ranges, rows)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, multimodal_embedding_reference(ids, table, ranges, rows))


def test_malformed_ranges_raise_the_reference_error(device):
    ids, table, ranges, rows = random_case(0, 8, torch.float32, device)
    for bad_ranges, bad_rows in [(ranges.flip(0), rows), (ranges, rows[1:]), (ranges[:, :1], rows)]:
        expected = raised(lambda: multimodal_embedding_reference(ids, table, bad_ranges, bad_rows))
        assert expected[0] is ValueError
        assert raised(lambda: multimodal_embedding_kernel(kernel(device), ids, table, bad_ranges, bad_rows)) == expected


def test_the_raw_op_never_reads_past_the_rows_even_for_ranges_the_dispatcher_refuses(device):
    table, rows = torch.randn(V, 8, device=device), torch.randn(3, 8, device=device)
    too_long = torch.tensor([[BASE, 1000]], device=device)  # claims 1000 rows, 3 exist
    ids = torch.tensor([1, BASE + 2, BASE + 999], device=device)
    out, error_tokens = kernel(device)(ids, table, too_long, rows, BASE)
    assert error_tokens.tolist() == [3, 2]  # no outside-vocabulary token; token 2 refused instead of read
    assert torch.equal(out[:2], torch.stack([table[1], rows[2]]))


# -- the dispatcher ---------------------------------------------------------------------


def test_kernel_mode_runs_the_extension_for_the_tensors_device(device, gather_mode, monkeypatch):
    calls = []
    compiled = kernel(device)
    monkeypatch.setattr(build, "cuda_gather" if device == "cuda" else "cpu_gather", lambda: calls.append(1) or compiled)
    gather_mode("kernel")
    ids, table, ranges, rows = random_case(5, 8, torch.float32, device)
    assert torch.equal(multimodal_embedding(ids, table, ranges, rows), multimodal_embedding_reference(ids, table, ranges, rows))
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: auto mode picks the kernel for CUDA tensors")
def test_auto_mode_runs_the_cuda_kernel_for_cuda_tensors(gather_mode, monkeypatch):
    calls = []
    compiled = kernel("cuda")
    monkeypatch.setattr(build, "cuda_gather", lambda: calls.append(1) or compiled)
    gather_mode("auto")
    ids, table, ranges, rows = random_case(6, 576, torch.bfloat16, "cuda")
    assert torch.equal(multimodal_embedding(ids, table, ranges, rows), multimodal_embedding_reference(ids, table, ranges, rows))
    assert calls == [1]


def test_auto_and_reference_modes_use_the_reference_on_the_cpu(gather_mode, monkeypatch):
    monkeypatch.setattr(build, "cpu_gather", lambda: pytest.fail("the CPU extension ran"))
    ids, table, ranges, rows = random_case(5, 8, torch.float32, "cpu")
    for mode in ("auto", "reference"):
        gather_mode(mode)
        assert torch.equal(multimodal_embedding(ids, table, ranges, rows), multimodal_embedding_reference(ids, table, ranges, rows))


def test_kernel_mode_refuses_a_dtype_the_kernel_does_not_take(gather_mode):
    gather_mode("kernel")
    ids, table, ranges, rows = random_case(5, 8, torch.float64, "cpu")
    with pytest.raises(ValueError, match="float64"):
        multimodal_embedding(ids, table, ranges, rows)


def test_without_a_cuda_build_auto_falls_back_with_one_warning_and_kernel_raises(gather_mode, monkeypatch, caplog):
    def unavailable():
        raise build.ToolchainMissing("cannot build the cuda gather extension: nvcc not found")

    monkeypatch.setattr(build, "cuda_gather", unavailable)
    monkeypatch.setattr(ops, "_warned_fallback", False)
    cuda_table = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # what _kernel_for looks at
    gather_mode("auto")
    with caplog.at_level(logging.WARNING, logger="cuda_ext.gather.ops"):
        assert ops._kernel_for(cuda_table) is None
        assert ops._kernel_for(cuda_table) is None
    warning = ("multimodal embedding: using the torch reference on CUDA, the kernel is unavailable: "
               "cannot build the cuda gather extension: nvcc not found")
    assert [r.getMessage() for r in caplog.records] == [warning]
    gather_mode("kernel")
    with pytest.raises(build.ExtensionUnavailable, match="nvcc not found"):
        ops._kernel_for(cuda_table)


def test_modes_come_from_the_environment_and_bad_ones_are_refused(monkeypatch, gather_mode):
    assert ops.embedding_gather() == Settings().embed_gather  # VLMQ_EMBED_GATHER as the process started with it
    monkeypatch.setenv("VLMQ_EMBED_GATHER", "Reference")
    assert Switch("embed_gather", Settings())() == "reference"
    monkeypatch.setenv("VLMQ_EMBED_GATHER", "fast")
    with pytest.raises(ValueError, match="VLMQ_EMBED_GATHER='fast'"):
        Switch("embed_gather", Settings())
    with pytest.raises(ValueError, match="unknown VLMQ_EMBED_GATHER mode 'fast'"):
        gather_mode("fast")


def test_the_generator_embeds_through_the_dispatcher(demo_model, gather_mode, monkeypatch):
    from generator_service.models.llama import LlamaForCausalLM

    calls = []
    compiled = kernel("cpu")
    monkeypatch.setattr(build, "cpu_gather", lambda: calls.append(1) or compiled)
    model = LlamaForCausalLM.from_checkpoint(demo_model)
    rows = torch.randn(4, model.config.hidden_size)
    ids, ranges = torch.tensor([1, BASE + 3, BASE, 2]), torch.tensor([[BASE, 4]])
    gather_mode("kernel")
    out = model.embed(ids, ranges, rows)
    assert calls == [1]
    assert torch.equal(out, multimodal_embedding_reference(ids, model.model.embed_tokens.weight, ranges, rows))


# -- the build --------------------------------------------------------------------------


def test_builds_are_cached_by_a_digest_of_their_sources(tmp_path, monkeypatch):
    before, decode = build.build_directory("gather_cpu"), build.build_directory("decode_cpu")
    assert build.build_directory("gather_cpu") == before and build.build_directory("gather_cuda") != before
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy)
    monkeypatch.setitem(build.EXTENSIONS, "gather_cpu", dataclasses.replace(build.EXTENSIONS["gather_cpu"], csrc=copy))
    assert build.build_directory("gather_cpu") == before  # same bytes, same folder: no rebuild
    (copy / "gather_index.h").write_text((copy / "gather_index.h").read_text() + "\n")
    assert build.build_directory("gather_cpu") != before
    assert build.build_directory("decode_cpu") == decode  # the other room's sources: not its build


def test_a_missing_toolchain_is_reported_before_any_build(monkeypatch):
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(build.ToolchainMissing, match="ninja not found"):
        build._build("gather_cpu")


# -- the CUDA sources under nvcc (no GPU needed) ---------------------------------------


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and shutil.which(str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")))
    if not path:
        pytest.skip("nvcc not found: the CUDA kernel's compile checks need the CUDA toolkit (nvcc on PATH or CUDA_HOME)")
    return path


def test_the_kernel_compiles_for_sm80_and_sm90_with_16_byte_accesses(nvcc, tmp_path):
    """nvcc as torch's extension build runs it (same standard and flags), for A100 and H100, keeping the PTX."""
    command = [nvcc, "-c", "-O3", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS, "--Werror", "all-warnings",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", "--resource-usage",
               "-keep", "-keep-dir", str(tmp_path), f"-I{CSRC}", str(CSRC / "multimodal_embedding_kernel.cu"),
               "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", result.stdout + result.stderr)
    kernels = {name for name, _ in entries}
    assert len(kernels) == 2  # 2-byte words (bfloat16, float16) and 4-byte words (float32)
    assert sorted(arch for _, arch in entries) == ["sm_80", "sm_80", "sm_90", "sm_90"]
    assert "spill" not in re.sub(r"0 bytes spill (stores|loads)", "", result.stdout + result.stderr)
    for arch in ("80", "90"):
        ptx = (tmp_path / f"multimodal_embedding_kernel.compute_{arch}.ptx").read_text()
        assert re.search(r"ld\.global\.nc\.v4\.u32", ptx) and re.search(r"st\.global\.v4\.u32", ptx)
    assert (tmp_path / "kernel.o").stat().st_size > 0


def test_the_cuda_binding_compiles_against_this_torchs_headers(nvcc, tmp_path):
    """The torch binding (.cpp, host compiler) type-checks against torch's c10/cuda and the CUDA runtime headers.

    The CPU wheel ships c10/cuda's headers but not the one CMake generates for CUDA builds
    (`c10/cuda/impl/cuda_cmake_macros.h`, which only declares the shared-library macro):
    the test supplies it. Linking needs a CUDA torch and is left to the GPU run.
    """
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "CUDAStream.h").exists():
        pytest.skip(f"torch at {torch_include} ships no c10/cuda headers")
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        generated.parent.mkdir(parents=True)
        generated.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    # The CUDA runtime headers where this nvcc finds them (it may be a wrapper script outside the toolkit).
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"], check=False, capture_output=True, text=True)
    cuda_includes = re.findall(r'-I"?([^"\s]+)', re.search(r"INCLUDES=(.*)", dryrun.stdout + dryrun.stderr).group(1))
    command = [shutil.which("c++") or "c++", "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror",
               *[f"-isystem{p}" for p in [*cpp_extension.include_paths(), tmp_path, *cuda_includes, sysconfig.get_paths()["include"]]],
               f"-I{CSRC}", str(CSRC / "multimodal_embedding_cuda.cpp")]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
