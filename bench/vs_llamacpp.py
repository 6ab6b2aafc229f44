"""dsocr against llama.cpp on the CPU, side by side: speed ratios on the same files and threads.

The same GGUF files and thread count for both; engines alternate run by run; medians of --reps runs.

llama.cpp is built once from the tree vendored in the llama-cpp-python sdist of a pinned version
(fetched by pip; needs cmake and a C++ compiler), with -DGGML_NATIVE=ON -DLLAMA_CURL=OFF and AMX
compiled out (see NO_AMX), into models/bench/llama.cpp/; --llama-cpp DIR takes a folder that already
holds llama-bench and llama-mtmd-cli instead. Not part of CI; run it on an otherwise idle machine. The files are dsocr's full-size random-weight pair (bench/common.py's
random_model), so llama.cpp loads exactly what dsocr writes: a file it refuses fails the run.

Stages (--stages):
* lm: the language model alone, 300-token prefill then 64 decoded tokens, per --lm-weights type:
  `llama-bench -p 300 -n 64` against bench/lm_speed.py's worker (runtime/ directly).
* page: one page end to end per --pages size (synthetic text pages, gundam views: a 1024 global view,
  plus 640 tiles once a side exceeds 640, which is what llama.cpp's DeepSeek-OCR preprocessing does),
  greedy, 64 tokens: `llama-mtmd-cli --chat-template deepseek-ocr --temp 0 -n 64 --ignore-eos` against
  `dsocr ocr --json`.
  Vision seconds, prefill and decode tok/s as each engine reports them; wall seconds and peak RSS of
  the whole process (load included) from wait4.
* ids: the first 32 greedy tokens on the 640x640 page (global view only, where llama.cpp's
  preprocessing matches the reference) with F16 files: how many leading ids agree (after a first
  difference the two continue from different text). llama.cpp's ids come from greedy-ids, a small
  program built beside the binaries on the same libmtmd/libllama path as llama-mtmd-cli.
Before the timed runs each engine runs once untimed (numba's cache, the page cache).

ratio = dsocr's speed over llama.cpp's, so > 1 means dsocr is faster (tok/s: dsocr / llama.cpp;
seconds and MB: llama.cpp / dsocr).

--model ocr2 runs the page and ids stages on DeepSeek-OCR 2's pair (llama.cpp's projector deepseekocr2:
768 tiles, its SAM position table resized without antialiasing and the global view's offset rounded half
away from zero, so its ids leave the reference's on tiled pages; the ids stage's 640x640 page has none).

    python bench/vs_llamacpp.py [--model ocr1|ocr2] [--stages lm,page,ids] [--threads N] [--llama-cpp DIR] [--json]
"""
import os

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_speed  # noqa: E402
from common import MODELS, random_model, run_measured, run_worker  # noqa: E402
from ocr_speed import synthetic_page  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"                      # its sdist vendors the llama.cpp tree we build
TARGETS = ("llama-bench", "llama-mtmd-cli", "llama-quantize")
LM_DECODE = 64                                   # lm_speed.PROMPT (300) tokens of prefill before it
PAGE_DECODE = 64
IDS_COMPARED = 32
TASK = "<|grounding|>Convert the document to markdown."
DSOCR_PROMPT = "<image>\n" + TASK
# mtmd's media marker; llama.cpp ends DeepSeek-OCR's image with "\n" itself, so this is the same sequence
LLAMA_PROMPT = "<__media__>" + TASK
HIGHER_IS_FASTER = {"tok/s"}                     # other units (s, MB): lower is better


# ggml's AMX matmul segfaults on this project's Xeon VMs (ggml-org/llama.cpp#20824, machine-dependent, no
# fix upstream): compile it out, so llama.cpp runs its AVX-512 (VNNI, BF16) kernels; explicit -mno-*
# flags win over -march=native whatever their order.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_CONFIGURE = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                   f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]


# llama-mtmd-cli prints token pieces, and the random vocabulary's unused ids print as nothing: this
# prints the greedy ids themselves, through the same libmtmd/libllama path (mtmd_tokenize with the
# media marker, mtmd_helper_eval_chunks, then argmax decoding). argv: LM MMPROJ IMAGE PROMPT N THREADS
GREEDY_IDS_CPP = r"""
#include "llama.h"
#include "mtmd.h"
#include "mtmd-helper.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
int main(int argc, char ** argv) {
    if (argc != 7) { fprintf(stderr, "usage: %s LM MMPROJ IMAGE PROMPT N THREADS\n", argv[0]); return 2; }
    const int n_gen = atoi(argv[5]), threads = atoi(argv[6]);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return 1;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 8192; cp.n_batch = 2048; cp.n_threads = cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    mtmd_context_params mp = mtmd_context_params_default();
    mp.use_gpu = false; mp.n_threads = threads;
    mtmd_context * mctx = mtmd_init_from_file(argv[2], model, mp);
    if (!ctx || !mctx) return 1;
    mtmd_bitmap * bitmap = mtmd_helper_bitmap_init_from_file(mctx, argv[3], false, mtmd_helper_init_opt_default()).bitmap;
    if (!bitmap) return 1;
    mtmd_input_text text = {argv[4], strlen(argv[4]), true, true};
    mtmd_input_chunks * chunks = mtmd_input_chunks_init();
    const mtmd_bitmap * bitmaps[] = {bitmap};
    llama_pos n_past = 0;
    if (mtmd_tokenize(mctx, chunks, &text, bitmaps, 1) ||
        mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, cp.n_batch, true, &n_past)) return 1;
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (int i = 0; i < n_gen; i++) {
        const float * logits = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        for (llama_token t = 1; t < n_vocab; t++) if (logits[t] > logits[best]) best = t;
        printf("%d\n", best);
        llama_batch batch = llama_batch_get_one(&best, 1);
        if (llama_decode(ctx, batch)) return 1;
    }
    return 0;
}
"""


def build_greedy_ids(src: Path, bin_dir: Path) -> None:
    (bin_dir / "greedy-ids.cpp").write_text(GREEDY_IDS_CPP)
    subprocess.run(["g++", "-O2", "-std=c++17", str(bin_dir / "greedy-ids.cpp"), "-o", str(bin_dir / "greedy-ids"),
                    *(f"-I{src / d}" for d in ("include", "ggml/include", "tools/mtmd")), f"-L{bin_dir}",
                    f"-Wl,-rpath,{bin_dir}", "-lmtmd", "-lllama", "-lggml", "-lggml-base"], check=True)


def build_llama_cpp(dest: Path, jobs: int) -> Path:
    """The bin/ folder of a llama.cpp built from the pinned sdist under dest (built once, reused while
    the configure flags stay the same)."""
    build = dest / "build"
    bin_dir, stamp = build / "bin", build / "dsocr-configure.json"
    if all((bin_dir / t).exists() for t in (*TARGETS, "greedy-ids")) and stamp.exists() and \
            json.loads(stamp.read_text()) == CMAKE_CONFIGURE:
        return bin_dir
    src = dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dest)], check=True)
        with tarfile.open(dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
            tar.extractall(dest, filter="data")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_CONFIGURE], check=True)
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TARGETS],
                   check=True)
    build_greedy_ids(src, bin_dir)
    stamp.write_text(json.dumps(CMAKE_CONFIGURE))
    return bin_dir


def llama_bench(bin_dir: Path, lm: Path, threads: int) -> dict:
    out, _, _, rss = run_measured([str(bin_dir / "llama-bench"), "-m", str(lm), "-p", str(lm_speed.PROMPT),
                                   "-n", str(LM_DECODE), "-t", str(threads), "-r", "1", "-o", "json"])
    tests = json.loads(out)
    rate = {("prefill" if t["n_gen"] == 0 else "decode"): t["avg_ts"] for t in tests}
    return {"prefill": rate["prefill"], "decode": rate["decode"], "peak rss": rss}


def dsocr_lm(lm: Path) -> dict:
    m, rss = run_worker(lm_speed.__file__, [str(lm), "cpu", str(LM_DECODE)])
    return {"prefill": lm_speed.PROMPT / m["prefill_s"], "decode": LM_DECODE / m["decode_s"], "peak rss": rss}


def llama_timings(stderr: str) -> dict:
    """vision s, prefill and decode tok/s from llama-mtmd-cli's log (at -lv 4): the image encode times
    (per slice, or per batch of slices in newer trees), and llama_perf_context_print's prompt eval
    (text and image tokens) and eval lines. Its prompt eval clock starts at the first decode (bos) and
    stops at the next synchronisation, after the image's tokens: the image encode in between is
    counted in it, so it is taken out here (llama-bench's pp300 agrees with what is left)."""
    slices = re.findall(r"(?:image slice encoded|mtmd batch encoding done) in (\d+) ms", stderr)
    prompt = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", stderr)
    decode = re.search(r"llama_perf_context_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs", stderr)
    if not (slices and prompt and decode):
        raise SystemExit("llama-mtmd-cli printed no timings (image encoded / prompt eval time / eval time)")
    vision = sum(map(int, slices)) / 1000
    prefill_s = float(prompt[1]) / 1000 - vision
    if prefill_s <= 0:
        raise SystemExit("llama-mtmd-cli's prompt eval time no longer includes the image encode: fix llama_timings")
    return {"vision": vision, "prefill": int(prompt[2]) / prefill_s, "decode": int(decode[2]) / float(decode[1]) * 1000}


def llama_page(bin_dir: Path, lm: Path, mm: Path, page: Path, threads: int) -> dict:
    # the named template "deepseek-ocr" is the plain concatenation our files' template spells out, which
    # llama.cpp does not recognise; -lv 4 makes it print its timings
    _, err, wall, rss = run_measured([str(bin_dir / "llama-mtmd-cli"), "-m", str(lm), "--mmproj", str(mm),
                                      "--image", str(page), "-p", LLAMA_PROMPT, "--chat-template", "deepseek-ocr",
                                      "--temp", "0", "-n", str(PAGE_DECODE), "--ignore-eos", "-t", str(threads),
                                      "-lv", "4"])
    return {**llama_timings(err), "wall": wall, "peak rss": rss}


def llama_greedy_ids(bin_dir: Path, lm: Path, mm: Path, page: Path, threads: int, n: int) -> list[int]:
    out, _, _, _ = run_measured([str(bin_dir / "greedy-ids"), str(lm), str(mm), str(page), LLAMA_PROMPT, str(n),
                                 str(threads)])
    return [int(t) for t in out.split()]


def dsocr_page(lm: Path, mm: Path, page: Path, threads: int, n: int = PAGE_DECODE) -> dict:
    # no --ignore-eos in dsocr: its decode tok/s counts the tokens it made (random weights rarely stop)
    out, _, wall, rss = run_measured([str(Path(sys.executable).parent / "dsocr"), "ocr", str(page), "--json", "-q",
                                      "--mode", "gundam", "-p", DSOCR_PROMPT, "--temperature", "0", "-n", str(n),
                                      "--no-repeat-ngram-size", "0", "-t", str(threads), "-m", str(lm),
                                      "--mmproj", str(mm)])
    r = json.loads(out)
    t = r["timings"]
    return {"vision": t["vision_s"], "prefill": t["prefill_tok_s"], "decode": t["decode_tok_s"], "wall": wall,
            "peak rss": rss, "token_ids": r["token_ids"]}


UNITS = {"prefill": "tok/s", "decode": "tok/s", "vision": "s", "wall": "s", "peak rss": "MB"}


def alternate(reps: int, runs: dict) -> dict:
    """{engine: {metric: median}} of `reps` rounds, each round running every engine once in turn, after
    one untimed round."""
    samples = {engine: [] for engine in runs}
    for rep in range(reps + 1):
        for engine, run in runs.items():
            m = run()
            if rep:
                samples[engine].append(m)
    return {e: {k: statistics.median(m[k] for m in ms) for k in UNITS if k in ms[0]} for e, ms in samples.items()}


def rows(stage: str, weights: str, page: str, med: dict) -> list[dict]:
    out = []
    for metric, unit in UNITS.items():
        if metric not in med["dsocr"]:
            continue
        d, ll = med["dsocr"][metric], med["llamacpp"][metric]
        out.append({"stage": f"{stage} {metric}", "weights": weights, "page": page, "dsocr": round(d, 2),
                    "llamacpp": round(ll, 2), "ratio": round(d / ll if unit in HIGHER_IS_FASTER else ll / d, 3),
                    "unit": unit})
    return out


def page_file(models: Path, size: tuple[int, int]) -> Path:
    path = models / "pages" / f"page-{size[0]}x{size[1]}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_page(size).save(path)
    return path


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h or w)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="lm,page,ids", help="comma separated: lm, page, ids")
    ap.add_argument("--lm-weights", default="q8_0,q4_k_m", help="language-model types of the lm stage")
    ap.add_argument("--page-weights", default="q8_0:f16", help="LM_TYPE:MMPROJ_TYPE of the page stage")
    ap.add_argument("--pages", default="640x640,1024x1024,1600x1200", help="page sizes WxH of the page stage")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="both engines (default: all cores)")
    ap.add_argument("--llama-cpp", type=Path, metavar="DIR", help="existing llama-bench and llama-mtmd-cli here")
    ap.add_argument("--models", type=Path, default=MODELS)
    ap.add_argument("--model", choices=("ocr1", "ocr2"), default="ocr1", help="DeepSeek-OCR or DeepSeek-OCR 2")
    ap.add_argument("--build-only", action="store_true", help="build llama.cpp and stop")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)       # dsocr's kernels; llama.cpp gets -t
    stages, results = args.stages.split(","), []
    if unknown := set(stages) - {"lm", "page", "ids"}:
        ap.error(f"--stages: unknown {', '.join(sorted(unknown))} (choose from lm, page, ids)")
    if args.llama_cpp and not all((args.llama_cpp / t).is_file() for t in ("llama-bench", "llama-mtmd-cli")):
        ap.error(f"--llama-cpp {args.llama_cpp}: no llama-bench and llama-mtmd-cli there")
    if args.llama_cpp and "ids" in stages and not (args.llama_cpp / "greedy-ids").is_file():
        ap.error(f"--llama-cpp {args.llama_cpp}: the ids stage needs greedy-ids, built with the pinned tree "
                 "(leave out --llama-cpp, or --stages lm,page)")
    bin_dir = args.llama_cpp or build_llama_cpp(args.models / "llama.cpp", args.threads)
    if args.build_only:
        print(bin_dir)
        return
    if "lm" in stages:
        for weights in args.lm_weights.split(","):
            lm = random_model(args.models, weights)["lm"]
            med = alternate(args.reps, {"llamacpp": lambda: llama_bench(bin_dir, lm, args.threads),
                                        "dsocr": lambda: dsocr_lm(lm)})
            results += rows("lm", weights, "-", med)
    if "page" in stages:
        lt, mt = args.page_weights.split(":")
        pair = random_model(args.models, lt, mt, which=("lm", "mmproj"), model=args.model)
        for size in map(parse_size, args.pages.split(",")):
            page = page_file(args.models, size)
            med = alternate(args.reps, {
                "llamacpp": lambda: llama_page(bin_dir, pair["lm"], pair["mmproj"], page, args.threads),
                "dsocr": lambda: dsocr_page(pair["lm"], pair["mmproj"], page, args.threads)})
            results += rows(f"{args.model} page", args.page_weights, f"{size[0]}x{size[1]}", med)
    if "ids" in stages:
        pair = random_model(args.models, "f16", "f16", which=("lm", "mmproj"), model=args.model)
        page = page_file(args.models, (640, 640))
        theirs = llama_greedy_ids(bin_dir, pair["lm"], pair["mmproj"], page, args.threads, IDS_COMPARED)
        ours = dsocr_page(pair["lm"], pair["mmproj"], page, args.threads, IDS_COMPARED)["token_ids"]
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        results.append({"stage": "ids agree", "weights": "f16:f16", "page": "640x640", "dsocr": agree,
                        "llamacpp": IDS_COMPARED, "ratio": round(agree / IDS_COMPARED, 3),
                        "unit": f"of first {IDS_COMPARED}"})
    if args.json:
        print(json.dumps({"threads": args.threads, "llama_cpp": str(bin_dir), "results": results}, indent=1))
        return
    print(f"dsocr vs llama.cpp ({bin_dir}), {args.threads} threads, medians of {args.reps}; ratio > 1: dsocr faster")
    cols = ["stage", "weights", "page", "dsocr", "llamacpp", "ratio", "unit"]
    print("  ".join(f"{c:>14}" for c in cols))
    for r in results:
        print("  ".join(f"{r[c]:>14}" for c in cols))


if __name__ == "__main__":
    main()
