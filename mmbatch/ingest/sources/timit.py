"""TIMIT: LDC layout in upper or lower case, and the Kaggle layout.

``{TRAIN,TEST}/DR1..DR8/<SPK>/<UTT>.{WAV,TXT,WRD,PHN}`` anywhere under INPUT
(the Kaggle copy nests it in ``data/`` and adds RIFF copies ``SA1.WAV.wav``:
those are skipped when the SPHERE ``.WAV`` is there, counted as
``skipped_riff_copies``). Matching is case-insensitive.

Splits: train = every TRAIN speaker; dev = the 50 dev speakers and test = the
24 core-test speakers, both from TEST. Other TEST speakers are not ingested
(``skipped_non_core``); SA1/SA2 are left out unless ``include_sa``
(``skipped_sa``) — Kaldi/ESPnet/SpeechBrain leave them out, Lhotse/HF keep them.

Rows: ``sample_id`` = ``<SPK>-<UTT>`` upper case (Lhotse's recording id),
``speaker`` = SPK, ``gender`` from its first letter, ``dialect_region`` (DR1..),
``sentence_type`` (SA/SX/SI), ``text`` from ``.TXT`` without the two sample
numbers, ``words``/``phones`` in seconds (samples / the file's sample rate).
Phones are kept as the 61 TIMIT symbols (``--phones 61``) or folded to 48 / 39
with the Lee & Hon map; folding deletes ``q`` (it has no mapping). Consecutive
equal folded symbols are not merged. The ``audio`` bytes are the SPHERE file
as-is; shorten-compressed SPHERE is quarantined (``sphere_shorten``).
"""
from __future__ import annotations

import posixpath
import re

from mmbatch import media
from mmbatch.errors import UsageError
from mmbatch.ingest.sources import common
from mmbatch.ingest.sources.common import Plan, Problem, Reject, Sample

KIND = "timit"
SAMPLE_RATE = 16000

CORE_TEST_SPEAKERS = frozenset(
    "fdhc0 felc0 fjlm0 fmgd0 fmld0 fnlp0 fpas0 fpkt0 mbpm0 mcmj0 mdab0 mgrt0 mjdh0 mjln0 mjmp0 mklt0 mlll0 "
    "mlnt0 mnjm0 mpam0 mtas1 mtls0 mwbt0 mwew0".split())
DEV_SPEAKERS = frozenset(
    "faks0 fdac1 fjem0 mgwt0 mjar0 mmdb1 mmdm2 mpdf0 fcmh0 fkms0 mbdg0 mbwm0 mcsh0 fadg0 fdms0 fedw0 mgjf0 "
    "mglb0 mrtk0 mtaa0 mtdt0 mthc0 mwjg0 fnmr0 frew0 fsem0 mbns0 mmjr0 mdls0 mdlf0 mdvc0 mers0 fmah0 fdrw0 "
    "mrcs0 mrjm4 fcal1 mmwh0 fjsj0 majc0 mjsw0 mreb0 fgjd0 fjmg0 mroa0 mteb0 mjfc0 mrjr0 fmml0 mrws1".split())

# Lee & Hon folding: phone61 -> (phone48, phone39). ``q`` has no mapping and is deleted when folding.
_PHONE_MAP_TEXT = (
    "aa aa aa, ae ae ae, ah ah ah, ao ao aa, aw aw aw, ax ax ah, ax-h ax ah, axr er er, ay ay ay, b b b, "
    "bcl vcl sil, ch ch ch, d d d, dcl vcl sil, dh dh dh, dx dx dx, eh eh eh, el el l, em m m, en en n, "
    "eng ng ng, epi epi sil, er er er, ey ey ey, f f f, g g g, gcl vcl sil, h# sil sil, hh hh hh, hv hh hh, "
    "ih ih ih, ix ix ih, iy iy iy, jh jh jh, k k k, kcl cl sil, l l l, m m m, n n n, ng ng ng, nx n n, "
    "ow ow ow, oy oy oy, p p p, pau sil sil, pcl cl sil, r r r, s s s, sh sh sh, t t t, tcl cl sil, "
    "th th th, uh uh uh, uw uw uw, ux uw uw, v v v, w w w, y y y, z z z, zh zh sh")
PHONE_MAP: dict[str, tuple[str, str]] = {
    p61: (p48, p39) for p61, p48, p39 in (item.split() for item in _PHONE_MAP_TEXT.split(", "))}
DELETED_PHONES = frozenset({"q"})

_UTT_FILE = re.compile(r"^(S[AXI]\d+)\.(WAV|TXT|WRD|PHN)(\.WAV)?$")
_SPEAKER = re.compile(r"^[MF][A-Z]{3}\d$")
_DR = re.compile(r"^DR[1-8]$")


# --- pure helpers -------------------------------------------------------------------
def parse_path(rel: str) -> dict | None:
    """``.../TRAIN/DR1/FCJF0/SA1.WAV`` (any case) -> its parts, or None for other files."""
    comps = rel.split("/")
    if len(comps) < 4:
        return None
    subset, dr, spk, name = (c.upper() for c in comps[-4:])
    m = _UTT_FILE.match(name)
    if not m or subset not in ("TRAIN", "TEST") or not _DR.match(dr) or not _SPEAKER.match(spk):
        return None
    ext = m.group(2)
    riff = bool(m.group(3))
    if riff and ext != "WAV":
        return None
    return {"subset": subset, "dr": dr, "speaker": spk, "utt": m.group(1),
            "role": "riff" if riff else ext.lower(), "dir": posixpath.dirname(rel)}


def split_of(subset: str, speaker: str) -> str | None:
    """train / dev / test, or None for a TEST speaker outside the dev and core-test lists."""
    if subset.upper() == "TRAIN":
        return "train"
    s = speaker.lower()
    if s in DEV_SPEAKERS:
        return "dev"
    if s in CORE_TEST_SPEAKERS:
        return "test"
    return None


def parse_txt(text: str) -> str:
    """``0 46797 She had your dark suit.`` -> ``She had your dark suit.`` (Reject when empty)."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    parts = line.strip().split(None, 2)
    if len(parts) >= 2 and parts[0].lstrip("-").isdigit() and parts[1].lstrip("-").isdigit():
        sentence = parts[2].strip() if len(parts) == 3 else ""
    else:
        sentence = line.strip()
    if not sentence:
        raise Reject(common.EMPTY_TRANSCRIPT, "the .TXT file holds no sentence")
    return sentence


def parse_segments(text: str, sample_rate: int = SAMPLE_RATE) -> list[dict]:
    """``.WRD``/``.PHN`` lines ``<start> <end> <label>`` (samples) -> [{start, end, symbol}] in seconds."""
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise Reject(common.BAD_ALIGNMENT, f"line {n}: expected '<start> <end> <label>', got {line.strip()!r}")
        try:
            start, end = int(parts[0]), int(parts[1])
        except ValueError:
            raise Reject(common.BAD_ALIGNMENT, f"line {n}: sample numbers are not integers: {line.strip()!r}") from None
        out.append({"start": start / sample_rate, "end": end / sample_rate, "symbol": parts[2]})
    return out


def fold_phone(symbol: str, phones: int = 61) -> str | None:
    """A 61-set symbol in the 61/48/39 set; None when it is deleted (``q`` when folding)."""
    if phones == 61:
        return symbol
    if symbol in DELETED_PHONES:
        return None
    folded = PHONE_MAP.get(symbol)
    if folded is None:
        return symbol
    return folded[0] if phones == 48 else folded[1]


def fold_phones(segments: list[dict], phones: int = 61) -> list[dict]:
    out = []
    for seg in segments:
        sym = fold_phone(seg["symbol"], phones)
        if sym is not None:
            out.append({**seg, "symbol": sym})
    return out


# --- planning -------------------------------------------------------------------------
def plan(uri: str, opts, exclude=()) -> Plan:
    fs, root = common.resolve_root(uri)
    listing = common.list_tree(fs, root, allow_outside=opts.allow_outside, exclude=exclude)
    files = listing.files
    groups: dict[tuple[str, str], dict] = {}
    for rel in sorted(files):
        p = parse_path(rel)
        if p is None:
            continue
        g = groups.setdefault((p["dir"], p["utt"]), {"meta": p, "paths": {}})
        g["paths"][p["role"]] = rel
    if not groups:
        raise UsageError(f"timit: no TIMIT utterance files ({{TRAIN,TEST}}/DR<n>/<SPEAKER>/<UTT>.WAV|TXT) "
                         f"found under {uri!r}; is this a TIMIT folder?")
    problems = common.listing_problems(
        listing, lambda r: (lambda p: f"{p['speaker']}-{p['utt']}" if p else None)(parse_path(r)))
    skipped = {"skipped_sa": 0, "skipped_non_core": 0, "skipped_riff_copies": 0}
    samples: list[Sample] = []
    for (_, utt), g in sorted(groups.items()):
        meta, paths = g["meta"], g["paths"]
        if "riff" in paths:
            if "wav" in paths:
                skipped["skipped_riff_copies"] += 1
            else:  # only the RIFF copy exists: use it
                paths["wav"] = paths["riff"]
        sentence_type = utt[:2]
        split = split_of(meta["subset"], meta["speaker"])
        if split is None:
            skipped["skipped_non_core"] += 1
            continue
        if sentence_type == "SA" and not opts.include_sa:
            skipped["skipped_sa"] += 1
            continue
        sid = f"{meta['speaker']}-{utt}"
        if "wav" not in paths:
            some = next(p for r, p in sorted(paths.items()) if r != "riff")
            problems.append(Problem(common.MISSING_AUDIO, f"{posixpath.basename(some)} has no .WAV beside it",
                                    path=some, sample_id=sid))
            continue
        if "txt" not in paths:
            problems.append(Problem(common.MISSING_TRANSCRIPT, "no .TXT transcript beside the audio",
                                    path=paths["wav"], sample_id=sid))
            continue
        roles = {"audio": paths["wav"], "txt": paths["txt"]}
        for r in ("wrd", "phn"):
            if r in paths:
                roles[r] = paths[r]
        entries = [files[p] for p in roles.values()]
        samples.append(Sample(
            key=paths["wav"], sample_id=sid, split=split, speaker=meta["speaker"],
            gender=meta["speaker"][0].lower(), dialect_region=meta["dr"], sentence_type=sentence_type,
            files=roles, nbytes=sum(e.size for e in entries), stamp=[common.stamp(e) for e in entries],
            extra={"utterance": utt}))
    if not samples and not problems:
        raise UsageError(f"timit: nothing to ingest under {uri!r}: {skipped}")
    info = {"phones": opts.phones, "include_sa": opts.include_sa}
    return Plan(kind=KIND, uri=uri, root=root, samples=samples, problems=problems, skipped=skipped, info=info)


# --- reading --------------------------------------------------------------------------------
def build_row(s: Sample, blobs: dict, options: dict) -> dict:
    row = common.empty_row(KIND, s)
    fields, facts = common.audio_fields(blobs["audio"], s.files["audio"])
    row.update(fields)
    sr = fields["sample_rate"] or SAMPLE_RATE
    row["text"] = parse_txt(common.decode_text(blobs["txt"], ".TXT transcript"))
    try:
        if "wrd" in blobs:
            row["words"] = parse_segments(blobs["wrd"].decode("ascii"), sr)
        if "phn" in blobs:
            row["phones"] = fold_phones(parse_segments(blobs["phn"].decode("ascii"), sr),
                                        int(options.get("phones", 61)))
    except UnicodeDecodeError as e:
        raise Reject(common.BAD_ALIGNMENT, f"alignment file is not ASCII: {e}") from None
    if media.is_sphere(blobs["audio"]):
        facts["sample_byte_format"] = media.sphere_header(blobs["audio"]).get("sample_byte_format")
    return common.finish_extra(row, {**s.extra, **facts})
