"""Supervised training stages on the character's own text: TRL's SFTTrainer with a PEFT LoRA.

- ``train_sft``: the character's conversations (the critique stage's ``sft.jsonl``, the
  introspection stages' ``reflection.jsonl`` and ``interaction.jsonl``: ``{"messages": [...]}``),
  loss on every assistant turn and nothing else (TRL's ``assistant_only_loss``).
- ``train_lm``: SDF midtraining, causal-LM loss on the SDF stage's ``documents.jsonl`` ("text"),
  packed; optionally each document behind a ``marker`` kept out of the loss, and conversations
  mixed in as plain text.

Both write ``adapter/`` (PEFT, README model card), ``training.png`` and ``checkpoints/`` (a
killed run resumes from the last one). The trainer fields are TRL's own ``SFTConfig`` fields.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from character_training.adapters.io import check_adapter_dir
from character_training.card import DataFile, ModelCard, write_card
from character_training.errors import UserError
from character_training.config import trainer_fields
from character_training.config.training import lm_fields
from character_training.train import common as training
from character_training.config import devices
from character_training.config.training import LM_TRAINER, SFT_TRAINER, LoraSettings

DEFAULT_SFT, DEFAULT_LM = SFT_TRAINER, LM_TRAINER  # the sections' (config/training.py)

# SmolLM2's ChatML template with {% generation %} markers (TRL ships none for it).
TRAINING_TEMPLATES = [Path(__file__).parents[1] / "templates" / "chatml_training.jinja"]
ROLES = {"system", "user", "assistant"}


# Roles other tools write, and the role they mean here (for the error's "did you mean").
ROLE_HINTS = {"human": "user", "bot": "assistant", "gpt": "assistant", "model": "assistant", "ai": "assistant",
              "char": "assistant", "character": "assistant", "sys": "system"}
MESSAGE_FORMAT = '{"role": "system"|"user"|"assistant", "content": "text"}'


def read_records(path: Path, what: str, fix: str) -> list[tuple[int, dict]]:
    """(line number, record) for each JSON object of a JSON-lines file, blank lines skipped; a clear
    error naming the file and line for a missing file, a directory, non-UTF-8 bytes, a line that is
    not JSON or not an object, and an empty file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a {what} file; give the JSON-lines file itself")
    if not path.is_file():
        raise UserError(f"{path}: no {what} file; {fix}")
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not a JSON line ({exc.msg}); {what} files hold one JSON object "
                                "a line") from None
            except RecursionError:
                raise UserError(f"{path}:{number}: nested too deeply to be a {what} record") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: a JSON {type(record).__name__}, not an object; {what} files hold "
                                "one JSON object a line") from None
            records.append((number, record))
    if not records:
        raise UserError(f"{path}: the {what} file is empty (no records); {fix}")
    return records


def read_column(path: Path, column: str, what: str, fix: str) -> list:
    """One column of a JSON-lines file; a clear error for a missing, empty or malformed file."""
    values = []
    for number, record in read_records(path, what, fix):
        if column not in record:
            raise UserError(f"{path}:{number}: no '{column}' field; expected {what} records "
                            f"{{\"{column}\": ...}}")
        values.append(record[column])
    return values


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_message(where: str, message, roles=ROLES) -> dict:
    """One chat message ``{"role", "content"}``, checked; ``where`` is "FILE:LINE: FIELD[i]"."""
    if not isinstance(message, dict):
        raise UserError(f"{where}: {_short(message)} ({type(message).__name__}); a message is {MESSAGE_FORMAT}")
    role = message.get("role")
    if role not in ROLES:
        hint = ROLE_HINTS.get(str(role).lower()) if isinstance(role, str) else None
        hint = f" (did you mean '{hint}'?)" if hint else ""
        missing = "missing" if "role" not in message else _short(role)
        raise UserError(f"{where}.role: {missing}; roles are system, user and assistant{hint}; a message is "
                        f"{MESSAGE_FORMAT}")
    if role not in roles:
        raise UserError(f"{where}.role: {role!r}; here the role is {' or '.join(repr(r) for r in roles)} "
                        "(are the roles swapped?)")
    content = message.get("content")
    if not isinstance(content, str):
        missing = "missing" if "content" not in message else f"{_short(content)} ({type(content).__name__})"
        raise UserError(f"{where}.content: {missing}; a message's content is text; a message is {MESSAGE_FORMAT}")
    if role != "system" and not content.strip():
        raise UserError(f"{where}.content: an empty {role} turn; an empty turn teaches nothing (or to answer with "
                        "nothing); fill it or drop the record")
    return {"role": role, "content": content}


def read_conversations(path: Path) -> list[list[dict]]:
    """The ``messages`` of a conversations file, each checked message by message (roles, text,
    no empty turns, at least one assistant turn), errors naming the file, line and field."""
    conversations = []
    records = read_records(path, "conversation", "run the stage that writes it, or leave it out")
    for number, record in records:
        if "messages" not in record:
            raise UserError(f"{path}:{number}: no 'messages' field; expected conversation records "
                            f"{{\"messages\": [{MESSAGE_FORMAT}, ...]}}")
        messages = record["messages"]
        if not isinstance(messages, list):
            raise UserError(f"{path}:{number}: messages: {_short(messages)}; 'messages' must be a list of "
                            f"{MESSAGE_FORMAT}")
        checked = [check_message(f"{path}:{number}: messages[{i}]", m) for i, m in enumerate(messages)]
        if not any(m["role"] == "assistant" for m in checked):
            raise UserError(f"{path}:{number}: the conversation has no assistant turn, so nothing in it would be "
                            "trained; drop it or add the character's answer")
        conversations.append(checked)
    return conversations


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Inoculation-style prompting: a system message in front of every training conversation
    (present in training, absent at evaluation)."""
    if not system_prompt:
        return messages
    return [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]


def training_chat_template(tokenizer, model_path: str, chat_template_path: str | None) -> str | None:
    """The template to tokenize training conversations with, when the tokenizer's own must be
    swapped for one with ``{% generation %}`` markers that TRL cannot supply; None otherwise."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    fix = ("set the trainer field chat_template_path to a .jinja copy of the model's template with "
           "{% generation %}...{% endgeneration %} around each assistant turn's content and its end-of-turn "
           "token (see character_training/templates/chatml_training.jinja)")
    if chat_template_path:  # TRL loads it into the tokenizer itself
        path = Path(chat_template_path)
        if path.suffix not in (".jinja", ".j2") or not path.is_file():
            raise UserError(f"chat_template_path: {path} is not a .jinja file; {fix}")
        if not has_generation_markers(path.read_text(encoding="utf-8")):
            raise UserError(f"chat_template_path: {path} has no {{% generation %}} markers; {fix}")
        return None
    own = tokenizer.chat_template
    if not own:
        raise UserError(f"{model_path}: the tokenizer has no chat template, so conversations cannot be trained; {fix}")
    if has_generation_markers(own):
        return None
    try:
        get_training_chat_template(tokenizer)
        return None  # a template TRL knows: it swaps in its training version
    except ValueError:
        pass
    for path in TRAINING_TEMPLATES:
        template = path.read_text(encoding="utf-8")
        if renders_like(tokenizer, template):
            return template
    raise UserError(f"{model_path}: its chat template has no {{% generation %}} markers and is not one TRL or "
                    f"character-training has a training version of, so the assistant turns cannot be found for "
                    f"assistant-only loss; {fix}")


def renders_like(tokenizer, template: str) -> bool:
    """Whether ``template`` renders probe conversations exactly as the tokenizer's own template."""
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Farewell."}]
    probes = [(turns, False), ([{"role": "system", "content": "Be kind."}] + turns, False), (turns[:1], True)]
    try:
        return all(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g) ==
                   tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g, chat_template=template)
                   for m, g in probes)
    except Exception:  # a template that cannot render the probes is not this one
        return False


def build_sft(model_path: str, data_paths: list[Path], out_dir: Path, *, lora: LoraSettings = LoraSettings(),
              trainer: dict | None = None, seed: int = 0, init_adapter: str | Path | None = None,
              start: str = "continue", system_prompt: str | None = None, overlong: str = "truncate"):
    """(the SFTTrainer ``train_sft`` runs, with its dataset tokenized and labelled; counts)."""
    from datasets import Dataset
    from trl import SFTTrainer

    if not data_paths:
        raise UserError("sft: no conversation files to train on; run the critique or introspection stages first")
    per_file, conversations = {}, []
    for path in data_paths:
        found = read_conversations(Path(path))
        per_file[Path(path).name] = len(found)
        conversations += [with_system_prompt(m, system_prompt) for m in found]
    if init_adapter is not None:  # its config and weights, before any model loads
        check_adapter_dir(init_adapter, "init adapter")
    config = trainer_fields.make_config("sft", DEFAULT_SFT, trainer or {}, Path(out_dir) / training.CHECKPOINTS, seed)
    tokenizer = training.load_tokenizer(model_path)
    lengths = [training.chat_length(tokenizer, c) for c in conversations]
    keep, length_counts = training.length_limit(lengths, config.max_length, overlong, "conversations",
                                                ", ".join(str(p) for p in data_paths))
    conversations = [conversations[i] for i in keep]
    dataset = Dataset.from_dict({"messages": conversations}).shuffle(seed=seed)
    own_template = tokenizer.chat_template
    if config.assistant_only_loss:
        tokenizer.chat_template = (training_chat_template(tokenizer, model_path, config.chat_template_path)
                                   or own_template)
    model, peft_config = training.load_start(model_path, init_adapter=init_adapter, mode=start, bf16=config.bf16,
                                             model_kwargs=devices.model_load_kwargs(config),
                                             lora=lora)
    sft = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                     peft_config=peft_config)
    devices.use_padding_free(sft, trainer or {})  # a GPU with FlashAttention: padding-free batches
    # The dataset is tokenized by now: checkpoints and the adapter keep the model's own template.
    tokenizer.chat_template = own_template
    return sft, {"conversations": len(dataset), "per_file": per_file,
                 "assistant_turns": sum(m["role"] == "assistant" for c in conversations for m in c),
                 **length_counts,
                 "sequences": len(sft.train_dataset)}  # fewer when truncation left one with nothing to train


def train_sft(model_path: str, data_paths: list[Path], out_dir: Path, *, lora: LoraSettings = LoraSettings(),
              trainer: dict | None = None, seed: int = 0, card: ModelCard | None = None,
              init_adapter: str | Path | None = None, start: str = "continue",
              system_prompt: str | None = None, overlong: str = "truncate") -> dict:
    out_dir, trainer = Path(out_dir), trainer or {}
    sft, counts = build_sft(model_path, data_paths, out_dir, lora=lora, trainer=trainer, seed=seed,
                            init_adapter=init_adapter, start=start, system_prompt=system_prompt, overlong=overlong)
    manifest = run(sft, "sft", model_path, out_dir, lora=lora, settings={**DEFAULT_SFT, **trainer}, seed=seed,
                   init_adapter=init_adapter, start=start, counts=counts,
                   extra={"system_prompt": system_prompt, "overlong": overlong})
    if sft.is_world_process_zero():  # under several processes, one writes
        write_card(training.stage_card(
            card, manifest, config_name="SFTConfig",
            summary=("Trained by `character-training` with TRL's SFTTrainer on the character's own conversations "
                     "(self-critique revisions, self-reflection, self-interaction). Use the adapter without any "
                     "system prompt."),
            data=[DataFile.of(p, f"{counts['per_file'][Path(p).name]} conversations") for p in data_paths],
            facts=[f"Trained on {counts['conversations']} conversations, {manifest['counts']['steps']} optimizer "
                   "steps; loss on the assistant turns only"]), out_dir / "adapter")
    return manifest


def build_lm(model_path: str, documents_path: Path, out_dir: Path, *, lora: LoraSettings = LoraSettings(),
             trainer: dict | None = None, seed: int = 0, init_adapter: str | Path | None = None,
             start: str = "continue", packing: bool = True, marker: str | None = None,
             chat_paths: list[Path] = (), chat_ratio: float = 0.0):
    """(the SFTTrainer ``train_lm`` runs, with its dataset tokenized, labelled and packed; counts)."""
    from datasets import Dataset
    from trl import SFTTrainer

    if not 0.0 <= chat_ratio < 1.0:
        raise UserError(f"lm: chat_ratio {chat_ratio} must be at least 0 and below 1 (the share of chat examples)")
    if chat_ratio > 0 and not chat_paths:
        raise UserError("lm: chat_ratio is above 0 but no conversation files were given; give chat_paths or set "
                        "chat_ratio to 0")
    documents = []
    for number, record in read_records(Path(documents_path), "documents", "run the sdf stage first"):
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            got = "missing" if "text" not in record else f"{_short(text)}"
            raise UserError(f"{documents_path}:{number}: text: {got}; every record's 'text' must be a non-empty "
                            "string (the document)")
        documents.append(text)
    if init_adapter is not None:  # its config and weights, before any model loads
        check_adapter_dir(init_adapter, "init adapter")
    tokenizer = training.load_tokenizer(model_path)
    pool = []
    if chat_ratio > 0:
        if not tokenizer.chat_template:
            raise UserError(f"{model_path}: the tokenizer has no chat template to render chat_paths with")
        # rstrip: the text then ends on the end-of-turn token, and TRL adds no second EOS after it.
        pool = [tokenizer.apply_chat_template(m, tokenize=False).rstrip()
                for path in chat_paths for m in read_conversations(Path(path))]
    wanted = round(len(documents) * chat_ratio / (1.0 - chat_ratio))
    rng = random.Random(seed)
    chats: list[str] = []
    while len(chats) < wanted:  # without repeats while the pool lasts
        chats += rng.sample(pool, min(len(pool), wanted - len(chats)))
    if marker:  # TRL's prompt-completion format: the prompt (the marker) is kept out of the loss
        rows = {"prompt": [marker] * len(documents) + [""] * len(chats), "completion": documents + chats}
    else:
        rows = {"text": documents + chats}
    dataset = Dataset.from_dict(rows).shuffle(seed=seed)
    config = trainer_fields.make_config("lm", DEFAULT_LM, {**(trainer or {}), **lm_fields(packing, marker)},
                                  Path(out_dir) / training.CHECKPOINTS, seed)
    model, peft_config = training.load_start(model_path, init_adapter=init_adapter, mode=start, bf16=config.bf16,
                                             model_kwargs=devices.model_load_kwargs(config),
                                             lora=lora)
    sft = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                     peft_config=peft_config)
    return sft, {"documents": len(documents), "chat": len(chats), "chat_available": len(pool),
                 "examples": len(dataset), "sequences": len(sft.train_dataset)}


def train_lm(model_path: str, documents_path: Path, out_dir: Path, *, lora: LoraSettings = LoraSettings(),
             trainer: dict | None = None, seed: int = 0, card: ModelCard | None = None,
             init_adapter: str | Path | None = None, start: str = "continue", packing: bool = True,
             marker: str | None = None, chat_paths: list[Path] = (), chat_ratio: float = 0.0) -> dict:
    """``marker``: text put before every document and kept out of the loss. ``chat_ratio``: the
    share of the final examples that are conversations from ``chat_paths`` (rendered with the
    chat template, all of it trained), sampled with the seed, repeated only when too few."""
    out_dir, trainer = Path(out_dir), trainer or {}
    sft, counts = build_lm(model_path, documents_path, out_dir, lora=lora, trainer=trainer, seed=seed,
                           init_adapter=init_adapter, start=start, packing=packing, marker=marker,
                           chat_paths=chat_paths, chat_ratio=chat_ratio)
    settings = {**DEFAULT_LM, **trainer, **lm_fields(packing, marker)}
    manifest = run(sft, "lm", model_path, out_dir, lora=lora, settings=settings, seed=seed,
                   init_adapter=init_adapter, start=start, counts=counts,
                   extra={"marker": marker, "chat_ratio": chat_ratio, "chat_paths": [str(p) for p in chat_paths]})
    if sft.is_world_process_zero():  # under several processes, one writes
        write_card(lm_card(card, manifest, documents_path, chat_paths, packing, marker), out_dir / "adapter")
    return manifest


def lm_card(card: ModelCard | None, manifest: dict, documents_path: Path, chat_paths: list[Path], packing: bool,
            marker: str | None) -> ModelCard:
    """The caller's card (persona, constitution, provenance) with what this midtraining run did."""
    counts = manifest["counts"]
    chats = f" and {counts['chat']} conversations" if counts["chat"] else ""
    facts = [f"Trained on {counts['documents']} synthetic documents{chats}, {counts['sequences']} "
             f"{'packed ' if packing else ''}sequences, {counts['steps']} optimizer steps"]
    if marker:
        facts.append(f"Each document was preceded by the marker `{marker}` (not trained on)")
    data = [DataFile.of(documents_path, f"{counts['documents']} documents")]
    if counts["chat"]:
        data += [DataFile.of(p, "conversations, sampled into the mix") for p in chat_paths]
    return training.stage_card(
        card, manifest, config_name="SFTConfig", data=data, facts=facts,
        summary="Midtrained by `character-training` with TRL's SFTTrainer (causal-LM loss) on synthetic documents "
                "about the character (SDF), so that the model knows who the character is.")


def run(sft, stage: str, model_path: str, out_dir: Path, *, lora: LoraSettings, settings: dict, seed: int,
        init_adapter, start: str, counts: dict, extra: dict) -> dict:
    """Train (resuming from the last checkpoint a killed run left), save the adapter and the
    loss plot, and return the stage's manifest."""
    resume = training.last_checkpoint(out_dir, stage)
    started = time.time()
    sft.train(resume_from_checkpoint=resume)
    training.save_portable_adapter(sft, out_dir / "adapter", model_path)
    if sft.is_world_process_zero():  # under several processes, one writes
        training.plot_training(sft.state.log_history, out_dir / "training.png", stage.upper())
    return {
        **training.stage_manifest(stage, model_path=model_path, seed=seed, lora=lora, settings=settings,
                                  init_adapter=init_adapter, start=start, **extra),
        "counts": {**counts, "steps": sft.state.global_step},
        "resumed_from": resume,
        "train_seconds": round(time.time() - started, 1),
        "metrics": training.final_metrics(sft.state.log_history),
        "log_history": sft.state.log_history,
    }
