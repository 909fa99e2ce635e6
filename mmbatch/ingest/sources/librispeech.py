"""LibriSpeech (OpenSLR SLR12 layout).

``<part>/<reader>/<chapter>/<reader>-<chapter>-NNNN.flac`` plus one
``<reader>-<chapter>.trans.txt`` per chapter (``<utt-id> <TEXT>``, split on the
first space) and ``SPEAKERS.TXT`` at the corpus root (``ID | SEX | SUBSET |
MINUTES | NAME``, ``;`` comments). ``INPUT`` may be the ``LibriSpeech`` folder or
one part folder.

Rows: ``sample_id`` = utterance id, ``split`` = part name (``train-clean-100``),
``speaker`` = reader id (Lhotse's convention), ``chapter``, ``gender`` m/f,
``text`` as in the transcript, duration/sample_rate/num_samples from the FLAC
header, ``label`` null. Unlike Lhotse, a transcript line without its FLAC is
quarantined (``missing_audio``), not just logged; a FLAC without a line too
(``missing_transcript``).
"""
from __future__ import annotations

import posixpath

from mmbatch.errors import UsageError
from mmbatch.ingest.sources import common
from mmbatch.ingest.sources.common import Plan, Problem, Reject, Sample

KIND = "librispeech"
SPEAKERS_FILE = "SPEAKERS.TXT"
TRANS_SUFFIX = ".trans.txt"


# --- pure parsers -------------------------------------------------------------------
def utt_id_of(line: bytes) -> str:
    """The utterance id of a transcript line, whatever the rest holds."""
    return line.strip().split(None, 1)[0].decode("ascii", "replace") if line.strip() else ""


def parse_trans_line(line: bytes) -> tuple[str, str]:
    """``b'1272-128104-0000 MISTER QUILTER'`` -> ``('1272-128104-0000', 'MISTER QUILTER')``.

    Raises :class:`Reject` (``transcript_not_utf8`` / ``empty_transcript``).
    """
    text = common.decode_text(line.rstrip(b"\r\n"), "transcript line")
    parts = text.strip().split(" ", 1)
    utt = parts[0].strip()
    body = parts[1].strip() if len(parts) > 1 else ""
    if not body:
        raise Reject(common.EMPTY_TRANSCRIPT, f"transcript line for {utt} has no text")
    return utt, body


def parse_speakers(text: str) -> dict[str, str]:
    """``SPEAKERS.TXT`` -> {reader id: 'm'|'f'}."""
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        fields = [f.strip() for f in line.split("|")]
        if len(fields) >= 2 and fields[0]:
            g = common.norm_gender(fields[1])
            if g:
                out[fields[0]] = g
    return out


def part_of(root: str, rel: str) -> str:
    """The part folder name of a file ``<part>/<reader>/<chapter>/<file>`` (INPUT may be the part)."""
    comps = (root.rstrip("/") + "/" + rel).split("/")
    return comps[-4] if len(comps) >= 4 else ""


# --- planning -------------------------------------------------------------------------
def plan(uri: str, opts, exclude=()) -> Plan:
    fs, root = common.resolve_root(uri)
    listing = common.list_tree(fs, root, allow_outside=opts.allow_outside, exclude=exclude)
    files = listing.files
    trans = sorted(r for r in files if r.endswith(TRANS_SUFFIX))
    flacs = {r for r in files if r.lower().endswith(".flac")}
    if not trans:
        raise UsageError(f"librispeech: no transcripts (*{TRANS_SUFFIX}) found under {uri!r}"
                         + (f" ({len(flacs)} .flac files but no transcripts)" if flacs else "")
                         + "; give the LibriSpeech folder or one part folder (e.g. LibriSpeech/dev-clean)")
    problems = common.listing_problems(
        listing, lambda r: posixpath.basename(r)[:-5] if r.lower().endswith(".flac") else
        (posixpath.basename(r) if r.endswith(TRANS_SUFFIX) else None))

    # speakers: in the listing, else next to the part folder
    genders: dict[str, str] = {}
    spk = [r for r in files if posixpath.basename(r).upper() == SPEAKERS_FILE]
    spk_path = posixpath.join(root, min(spk, key=lambda r: r.count("/"))) if spk else None
    if spk_path is None:
        cand = posixpath.join(posixpath.dirname(root), SPEAKERS_FILE)
        spk_path = cand if fs.exists(cand) else None
    if spk_path:
        with fs.open(spk_path, "rb") as f:
            genders = parse_speakers(f.read().decode("utf-8", "replace"))

    blobs = common.fetch(fs, [posixpath.join(root, r) for r in trans])
    samples: list[Sample] = []
    claimed: set[str] = set()
    for t in trans:
        raw = blobs[posixpath.join(root, t)]
        if isinstance(raw, BaseException):
            problems.append(Problem(common.READ_ERROR, f"{type(raw).__name__}: {raw}", path=t))
            continue
        d = posixpath.dirname(t)
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            utt = utt_id_of(line)
            audio = posixpath.join(d, f"{utt}.flac") if d else f"{utt}.flac"
            has_audio = audio in files
            if has_audio:
                claimed.add(audio)
            try:
                utt, text = parse_trans_line(line)
            except Reject as e:
                problems.append(Problem(e.reason, f"{e.detail} ({t})", path=audio if has_audio else t,
                                        sample_id=utt))
                continue
            if not has_audio:
                problems.append(Problem(common.MISSING_AUDIO, f"transcript line in {t} has no audio file {audio}",
                                        path=audio, sample_id=utt))
                continue
            ids = utt.split("-")
            comps = audio.split("/")
            reader = ids[0] if len(ids) == 3 else (comps[-3] if len(comps) >= 3 else None)
            chapter = ids[1] if len(ids) == 3 else (comps[-2] if len(comps) >= 2 else None)
            e = files[audio]
            samples.append(Sample(
                key=audio, sample_id=utt, split=part_of(root, audio) or opts.split, text=text,
                speaker=reader, gender=genders.get(reader or ""), chapter=chapter,
                files={"audio": audio}, nbytes=e.size, stamp=common.stamp(e)))
    for audio in sorted(flacs - claimed):
        problems.append(Problem(common.MISSING_TRANSCRIPT, "no line for this utterance in its chapter's "
                                f"{TRANS_SUFFIX}", path=audio, sample_id=posixpath.basename(audio)[:-5]))
    parts = sorted({s.split for s in samples if s.split})
    info = {"parts": parts, "speakers_file": bool(spk_path)}
    return Plan(kind=KIND, uri=uri, root=root, samples=samples, problems=problems, info=info)


# --- reading --------------------------------------------------------------------------------
def build_row(s: Sample, blobs: dict, options: dict) -> dict:
    row = common.empty_row(KIND, s)
    fields, facts = common.audio_fields(blobs["audio"], s.files["audio"])
    row.update(fields)
    return common.finish_extra(row, {**s.extra, **facts})
