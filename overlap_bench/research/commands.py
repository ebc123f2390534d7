"""The research wing's commands, ``model`` and ``interference``, registered on the core CLI's app when imported
(through the ``overlap_bench.commands`` entry point, or by the checkout's cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from overlap_bench import check, runfolder
from overlap_bench.cli import AsJson, Backend, Dtype, Nproc, Tokens, command, guard, ints, out_console, out_path, \
    rank0, table
from overlap_bench.errors import UserError
from overlap_bench.records import json_safe
from overlap_bench.research import interference as itf, interference_report as itf_report
from overlap_bench.research.model import MODES as MODEL_MODES, model_main, model_table
from overlap_bench.research.nanobatch import NanoSettings


@command()
def model(
    preset: Optional[str] = typer.Option(None, help="Model preset (qwen2.5-72b, llama-3.1-70b, llama-3.1-405b, "
                                                    "tiny; default: qwen2.5-72b on GPUs, tiny on CPU)."),
    tp: Optional[int] = typer.Option(None, help="Tensor-parallel size (default: every rank)."),
    policy: Optional[Path] = typer.Option(None, help="Policy YAML from `overlap-bench export` (adds the policy mode)."),
    tokens: Tokens = None,
    layers: int = typer.Option(4, help="Decoder layers in the synthetic stack."),
    dtype: Dtype = None,
    warmup: int = typer.Option(2, help="Untimed forwards per mode before timing."),
    reps: int = typer.Option(9, help="Timed forwards per mode (split into interleaved rounds)."),
    nproc: Nproc = None,
    backend: Backend = "auto",
    out: Path = typer.Option(Path("runs/model"), parser=out_path,
                             help="Appends to model.jsonl (and writes env.json) here."),
    resume: bool = typer.Option(False, help="Continue the run in --out: record only the (M, mode) rows missing."),
    as_json: AsJson = False,
    mode: str = typer.Option("all", help="Modes, comma-separated: baseline, pr, policy, rowwise, rowwise+policy, "
                                         "nanobatch, nanobatch+policy, nocomm, or all (baseline and nocomm always "
                                         "run)."),
    nanobatches: int = typer.Option(NanoSettings.nanobatches, help="Nano-batches (token ranges) of nanobatch modes."),
    nano_comm: str = typer.Option(NanoSettings.comm, help="The nanobatch modes' all-reduce path: stream or async."),
    nano_priority: bool = typer.Option(NanoSettings.priority, help="The nanobatch modes' all-reduce on a "
                                                                   "high-priority NCCL stream."),
    nano_attention: str = typer.Option(NanoSettings.attention, help="How a later nano-batch attends to earlier keys: "
                                       "split (two calls merged by log-sum-exp) or lower-right (one masked call)."),
    shapes_tp: Optional[int] = typer.Option(None, help="Per-rank shapes of this tensor-parallel size on fewer ranks "
                                                       "(tp=4 shapes on 1 GPU: a schedule's overhead alone)."),
) -> None:
    """Prefill a synthetic TP decoder stack: tokens/s per mode (baseline, pr, policy, nano-batches), the
    communication share and how much of it each mode hid."""

    def body() -> None:
        modes = MODEL_MODES if mode.strip() == "all" else tuple(m.strip() for m in mode.split(",") if m.strip())
        try:
            nano = NanoSettings(nanobatches, nano_comm, nano_priority, nano_attention)
        except ValueError as e:
            flag = {"comm": "--nano-comm", "attention": "--nano-attention"}.get(str(e).split()[0], "--nanobatches")
            raise UserError(f"{flag}: {e}") from None
        records = model_main(preset, tp, ints(tokens, "--tokens") if tokens else None, layers, policy, dtype, warmup,
                             reps, out, backend=backend, nproc=nproc, modes=modes, nano=nano, shapes_tp=shapes_tp,
                             resume=resume, progress=not as_json)
        if not rank0():
            return
        if as_json:
            print("[" + ",\n".join(r.to_json() for r in records) + "]")
        else:
            out_console.print(model_table(records))

    guard(body, out, resume=True)


@command()
def interference(
    spec_path: Optional[Path] = typer.Argument(None, metavar="SPEC", help="Take shapes, tokens, dtype from a sweep "
                                                                          "YAML."),
    preset: Optional[str] = typer.Option(None, help="Model preset (default qwen2.5-72b): o_proj, down_proj at --tp."),
    tp: int = typer.Option(4, help="Tensor-parallel size that sets K per rank of the preset shapes."),
    shape: List[str] = typer.Option([], "--shape", "-s", help="K,N (K per rank), repeatable."),
    tokens: Optional[str] = typer.Option(None, "--tokens", "-m", help="Token counts (default 4096,8192,16384,32768)."),
    dtype: Optional[str] = typer.Option(None, help="bfloat16 (default), float16 or float32."),
    ctas: str = typer.Option(",".join(map(str, itf.DEFAULT_CTAS)), help="CTA counts of the communication-like "
                                                                        "kernel (none: skip)."),
    cta_gbps: str = typer.Option(f"{itf.DEFAULT_CTA_GBPS:g}", help="GB/s each CTA reads and writes (0 = full "
                                                                   "speed); comma-separated."),
    copy: str = typer.Option(",".join(itf.COPY_PATHS), help="Full-speed copies beside the GEMM: d2d (same device), "
                             "h2d, d2h (pinned host); each record says if it waited for SMs (none: skip)."),
    sms: str = typer.Option(",".join(itf.DEFAULT_SMS), help="Green-context sizes for the GEMM alone (none: skip)."),
    rounds: int = typer.Option(itf.ROUNDS, help="Passes over the conditions, each bracketed by references."),
    warmup: int = typer.Option(itf.WARMUP, help="Untimed repetitions per block."),
    reps: int = typer.Option(itf.REPS, help="Timed repetitions per block."),
    pace: bool = typer.Option(True, help="Give every repetition the side work's wall period, so references do not "
                                         "run hotter (power-limited) than interfered GEMMs."),
    comm_from: List[Path] = typer.Option([], help="Multi-GPU run dir: predict its t_joint from its t_gemm, t_comm "
                                                  "and this run's s(k) (repeatable)."),
    busbw: Optional[float] = typer.Option(None, help="Predict with t_comm from this all-reduce busbw (GB/s)..."),
    world: Optional[int] = typer.Option(None, help="...over this many ranks (nccl-tests' formula)."),
    comm_ctas: float = typer.Option(itf.DEFAULT_COMM_CTAS, help="CTAs the all-reduce holds (NCCL channels), for "
                                                                "s(k) in predictions."),
    from_dir: Optional[Path] = typer.Option(None, "--from", help="Predict from this interference run; no GPU needed."),
    out: Optional[Path] = typer.Option(None, parser=out_path,
                                       help="Run folder (default runs/interference, or --from's)."),
    as_json: AsJson = False,
) -> None:
    """On one GPU: the GEMM's slowdown beside communication-like CTAs, copy-engine traffic and green contexts;
    and the joint time and eta a multi-GPU run could reach."""

    def body() -> None:
        cfg = None
        if from_dir is None:
            shapes, spec_tokens, spec_dtype = itf.shapes_for(spec_path, preset, tp, shape)
            d = check.validate(check.Dtype, dtype or spec_dtype or "bfloat16", "--dtype")
            toks = ints(tokens, "--tokens") if tokens else (spec_tokens or [4096, 8192, 16384, 32768])
            cfg = itf.InterferenceConfig(shapes, toks, d, itf.parse_ctas(ctas), itf.parse_rates(cta_gbps),
                                         itf.parse_copies(copy), itf.parse_sms(sms), rounds, warmup, reps,
                                         pace=pace)
        itf.check_inputs(cfg, from_dir, comm_from, busbw, world, comm_ctas)  # before a folder is made
        run_dir = out or from_dir or Path("runs/interference")
        with runfolder.RunFolder(run_dir).claim("interference"):  # one writer per run folder
            records, preds = itf.run_interference(cfg, out=run_dir, from_dir=from_dir, comm_from=comm_from,
                                                  busbw=busbw, world=world, comm_ctas=comm_ctas,
                                                  progress=not as_json)
        if as_json:
            print(json.dumps(json_safe({"records": [json.loads(r.to_json()) for r in records],
                                        "predictions": [p.to_dict() for p in preds]})))
            return
        header, rows = itf_report.slowdown_table(records)
        out_console.print(table(f"GEMM slowdown, {records[0].device if records else '?'} ({run_dir})", header,
                                 [list(map(escape, r)) for r in rows], ("shape",)))
        if preds:
            out_console.print(table(f"predicted joint time and eta (s at {comm_ctas:g} CTAs)",
                                     itf_report.PRED_HEADER, [list(map(escape, r)) for r in
                                                              itf_report.prediction_rows(preds)],
                                     ("shape", "env", "t_comm from")))

    guard(body, None)
