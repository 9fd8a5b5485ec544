"""Read PDB / mmCIF / BinaryCIF files (gzipped or not) into ``ProteinChain`` records.

Policy, in one place:
- the format comes from the suffix, else from the content (CATH dompdb files have no suffix);
- first model only; altlocs resolved by provq itself, per residue, by ``altloc`` (default: the
  location with the highest total occupancy), with any altloc id (letters or digits), so every
  biotite version gives the same residues;
- every chain with amino-acid residues is a candidate (waters, ligands, nucleic acids dropped);
  modified residues (MSE, SEP, ...) are amino acids by the PDB chemical component dictionary
  and are kept;
- residues keep their file order (insertion codes included); a residue missing N, CA or C is
  kept and masked (NaN coordinates), never dropped, so positions stay aligned;
- a chain is usable when it has at least ``min_length`` residues with a full N/CA/C backbone
  (and, if ``max_length`` is set, at most that many residues);
- a file that cannot be read, or has no usable chain, raises ``StructureSkip`` with the reason.
"""

from __future__ import annotations

import gzip
import io
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from provq_lightning.protein.chain import AMINO_ACIDS, BACKBONE_ATOMS, UNKNOWN_AA, ProteinChain

PDB_SUFFIXES = (".pdb", ".ent", ".pdb1")
CIF_SUFFIXES = (".cif", ".mmcif")
BCIF_SUFFIXES = (".bcif",)
STRUCTURE_SUFFIXES = PDB_SUFFIXES + CIF_SUFFIXES + BCIF_SUFFIXES
ALTLOC_POLICIES = ("occupancy", "first")
BLANK_CHAIN = "0"  # CATH's spelling of a blank chain id
BLANK_ALTLOCS = ("", ".", "?")  # after stripping; PDB writes a space, mmCIF '.' or '?'
# Bump whenever the same file can parse to different chains (it is part of the cache
# fingerprint, so old caches are rebuilt). 2: own altloc selection (numeric ids kept), author
# fields forced for mmCIF (biotite 2 reads label fields by default), content sniffing.
PARSER_VERSION = 2
SNIFF_BYTES = 65536
GZIP_MAGIC = b"\x1f\x8b"
# Record names a PDB file can start with (CATH dompdb starts at ATOM, SCOPe at HEADER/REMARK).
PDB_RECORDS = frozenset(
    "HEADER OBSLTE TITLE SPLIT CAVEAT COMPND SOURCE KEYWDS EXPDTA NUMMDL MDLTYP AUTHOR REVDAT "
    "SPRSDE JRNL REMARK DBREF DBREF1 DBREF2 SEQADV SEQRES MODRES HET HETNAM HETSYN FORMUL "
    "HELIX SHEET SSBOND LINK CISPEP SITE CRYST1 ORIGX1 SCALE1 MTRIX1 MODEL ATOM ANISOU HETATM "
    "TER".split()
)


class StructureSkip(Exception):
    """A structure file that yields no usable chain; ``str()`` is the one-line reason."""


@dataclass(frozen=True)
class ParseOptions:
    """How files become chains; part of the cache fingerprint, so changing it re-parses."""

    altloc: str = "occupancy"
    min_length: int = 10
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.altloc not in ALTLOC_POLICIES:
            raise ValueError(f"altloc must be one of {ALTLOC_POLICIES}, got {self.altloc!r}")
        if self.min_length < 1:
            raise ValueError(f"min_length must be >= 1, got {self.min_length}")
        if self.max_length is not None and self.max_length < self.min_length:
            raise ValueError(f"max_length {self.max_length} < min_length {self.min_length}")


def strip_suffixes(name: str) -> tuple[str, str, bool]:
    """``(stem, structure_suffix, gzipped)`` of a file name, e.g. 1abc.cif.gz -> 1abc, .cif."""
    gz = name.lower().endswith(".gz")
    base = name[:-3] if gz else name
    lower = base.lower()
    for suffix in STRUCTURE_SUFFIXES:
        if lower.endswith(suffix):
            return base[: -len(suffix)], suffix, gz
    return base, "", gz


def has_structure_suffix(path: Path) -> bool:
    return strip_suffixes(path.name)[1] != ""


def sniff_format(head: bytes) -> str | None:
    """'pdb', 'cif' or 'bcif' when a (decompressed) file's first bytes look like one, else None.

    Text must start (after blank lines and, for mmCIF, comments) with ``data_`` or a PDB record
    name; BinaryCIF is a MessagePack map holding ``dataBlocks``.
    """
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "bcif" if b"dataBlocks" in head else None
    if b"\x00" in head:
        return None
    for line in head.decode("latin-1").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("data_"):
            return "cif"
        record = line[:6].strip()
        return "pdb" if record in PDB_RECORDS and line[:6] == line[:6].upper() else None
    return None


def sniff_file(path: Path) -> str | None:
    """``sniff_format`` of a file's first bytes (gzip undone); None if unreadable."""
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
            if head.startswith(GZIP_MAGIC):
                f.seek(0)
                with gzip.open(f) as g:
                    head = g.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error):
        return None
    return sniff_format(head)


def is_structure_file(path: Path) -> bool:
    """A structure suffix (``.pdb``, ``.cif.gz``, ...), or PDB/mmCIF/BCIF content."""
    return has_structure_suffix(path) or sniff_file(path) is not None


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    # By suffix, or by content for suffix-less files (a gzipped dompdb file, say).
    if path.name.lower().endswith(".gz") or raw.startswith(GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise StructureSkip(f"truncated or corrupt gzip ({err})") from None
    if not raw.strip():
        raise StructureSkip("empty file")
    return raw


def _sniff_format(raw: bytes, suffix: str) -> str:
    """'pdb', 'cif' or 'bcif' from the suffix, else from the content (CATH dompdb has none)."""
    if suffix in BCIF_SUFFIXES:
        return "bcif"
    if suffix in CIF_SUFFIXES:
        return "cif"
    if suffix in PDB_SUFFIXES:
        return "pdb"
    sniffed = sniff_format(raw[:SNIFF_BYTES])
    if sniffed is not None:
        return sniffed
    try:  # unrecognised: text is read as PDB (biotite names what is wrong), binary as BCIF
        raw[:4096].decode("ascii")
    except UnicodeDecodeError:
        return "bcif"
    return "pdb"


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        # Real PDB/mmCIF text is ASCII; a few files carry Latin-1 in remarks. Binary junk has
        # NUL or many control bytes, which no structure text contains.
        if b"\x00" in raw:
            raise StructureSkip("binary content in a text structure file") from None
        return raw.decode("latin-1")


def _read_all_locations(raw: bytes, fmt: str):
    """First model with every altloc (``altloc_id`` annotation, when the file has any)."""
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    if fmt == "pdb":
        text = _decode_text(raw)
        return pdb.PDBFile.read(io.StringIO(text)).get_structure(
            model=1, altloc="all", extra_fields=["occupancy"]
        )
    if fmt == "bcif":
        cif = pdbx.BinaryCIFFile.read(io.BytesIO(raw))
    else:
        cif = pdbx.CIFFile.read(io.StringIO(_decode_text(raw)))
    # biotite 2 refuses altloc='all' without a label_alt_id column; such a file has no altlocs.
    mode = "all" if "label_alt_id" in cif.block["atom_site"] else "first"
    # Author chain ids and numbering, as in PDB files (biotite 2's default is the label fields).
    return pdbx.get_structure(
        cif, model=1, altloc=mode, extra_fields=["occupancy"], use_author_fields=True
    )


def select_altlocs(atoms, policy: str = "occupancy"):
    """One alternate location per residue: the highest total occupancy, or the first listed.

    A residue is a run of atoms with one chain, number and insertion code (so point mutants
    listed as two residue names at one position are one residue); ties go to the first listed.
    Atoms without an altloc id are always kept. Any id counts, letters or digits (biotite
    before 2.0 drops digit ids, e.g. 1k6p's '1'/'2', and with them whole residues).
    """
    if "altloc_id" not in atoms.get_annotation_categories():
        return atoms
    ids = np.char.strip(atoms.altloc_id.astype(str))
    alt = np.flatnonzero(~np.isin(ids, BLANK_ALTLOCS))
    if alt.size == 0:
        return atoms
    n = atoms.array_length()
    new_residue = np.zeros(n, dtype=bool)
    new_residue[0] = True
    for name in ("chain_id", "res_id", "ins_code"):
        values = atoms.get_annotation(name)
        new_residue[1:] |= values[1:] != values[:-1]
    residue = np.cumsum(new_residue)[alt]  # non-decreasing along alt
    if "occupancy" in atoms.get_annotation_categories():
        occupancy = np.nan_to_num(atoms.occupancy.astype(np.float64))
    else:
        occupancy = np.ones(n)
    keep = np.ones(n, dtype=bool)
    keep[alt] = False
    for group in np.split(alt, np.flatnonzero(np.diff(residue)) + 1):
        locs = ids[group]
        _, first = np.unique(locs, return_index=True)
        order = locs[np.sort(first)]  # ids in order of appearance
        chosen = order[0]
        if policy == "occupancy":
            totals = [occupancy[group[locs == loc]].sum() for loc in order]
            chosen = order[int(np.argmax(totals))]  # argmax: first of equal totals
        keep[group[locs == chosen]] = True
    return atoms[keep]


def read_atoms(path: Path, altloc: str = "occupancy"):
    """First model of a structure file as a biotite ``AtomArray``, one altloc per residue."""
    raw = _read_bytes(path)
    fmt = _sniff_format(raw, strip_suffixes(path.name)[1])
    try:
        # biotite warns about e.g. missing element columns (CATH dompdb); not our reader's news.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atoms = _read_all_locations(raw, fmt)
    except StructureSkip:
        raise
    except Exception as err:  # biotite raises many types on malformed input
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise StructureSkip(
            f"unreadable as {fmt.upper()} ({type(err).__name__}: {message[:160]})"
        ) from None
    return select_altlocs(atoms, altloc)


@lru_cache(maxsize=4096)
def _aatype(res_name: str) -> int:
    from biotite.structure.info import one_letter_code

    try:
        letter = one_letter_code(res_name)
    except Exception:
        letter = None
    if letter is None or letter.upper() not in AMINO_ACIDS:
        return UNKNOWN_AA
    return AMINO_ACIDS.index(letter.upper())


def residue_positions(res_id: np.ndarray) -> np.ndarray:
    """Increasing residue positions from author numbers (one entry per residue, file order).

    Numbering gaps are kept (missing residues leave a gap); insertion codes (equal res_id) and
    numbering that restarts or goes backwards advance by one, so order is never lost.
    """
    if res_id.size == 0:
        return np.zeros(0, dtype=np.int64)
    steps = np.diff(res_id.astype(np.int64))
    steps = np.where(steps >= 1, steps, 1)
    return np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)


def chain_from_atoms(chain_id: str, atoms) -> ProteinChain:
    """Backbone record of one chain's amino-acid atoms (all residues, in file order)."""
    import biotite.structure as struc

    starts = struc.get_residue_starts(atoms)
    n_res = len(starts)
    res_of_atom = np.searchsorted(starts, np.arange(atoms.array_length()), side="right") - 1
    coords = np.full((n_res, len(BACKBONE_ATOMS), 3), np.nan, dtype=np.float32)
    for slot, name in enumerate(BACKBONE_ATOMS):
        sel = np.flatnonzero(atoms.atom_name == name)
        # First occurrence wins if a residue lists an atom twice (broken files do).
        rows, first = np.unique(res_of_atom[sel], return_index=True)
        coords[rows, slot] = atoms.coord[sel[first]]
    aatype = np.array([_aatype(str(n)) for n in atoms.res_name[starts]], dtype=np.uint8)
    residue_index = residue_positions(atoms.res_id[starts])
    return ProteinChain(chain_id, coords, residue_index, aatype)


def chains_from_atoms(entry: str, atoms) -> list[tuple[str, ProteinChain]]:
    """Every chain with amino-acid residues as ``(author_chain_id, chain)``, file order."""
    import biotite.structure as struc

    atoms = atoms[struc.filter_amino_acids(atoms)]
    out = []
    # Keep first-appearance order of chain ids; a chain split into blocks is merged.
    _, first = np.unique(atoms.chain_id, return_index=True)
    for chain in atoms.chain_id[np.sort(first)]:
        label = str(chain).strip() or BLANK_CHAIN
        sub = atoms[atoms.chain_id == chain]
        out.append((str(chain), chain_from_atoms(f"{entry}_{label}", sub)))
    return out


def _chain_filter_reason(chain: ProteinChain, options: ParseOptions) -> str | None:
    usable = int(chain.backbone_mask.sum())
    if usable == 0:
        missing = [
            name
            for slot, name in enumerate(BACKBONE_ATOMS[:3])
            if not np.isfinite(chain.coords[:, slot]).any()
        ]
        detail = f" (no {'/'.join(missing)} atoms at all)" if missing else ""
        return f"no residue with a complete N/CA/C backbone{detail}"
    if usable < options.min_length:
        return f"{usable} residues with a full backbone < min_length {options.min_length}"
    if options.max_length is not None and len(chain) > options.max_length:
        return f"{len(chain)} residues > max_length {options.max_length}"
    return None


def select_chains(
    chains: list[ProteinChain], entry: str, wanted: Sequence[str] | None
) -> list[ProteinChain]:
    """Keep chains named in ``wanted`` (``<entry>_<chain>`` or a whole entry / CATH domain id)."""
    if wanted is None:
        return chains
    keys = {w.lower() for w in wanted}
    if entry.lower() in keys:
        return chains
    return [c for c in chains if c.id.lower() in keys]


@dataclass
class ParsedFile:
    """The usable chains of one file, and a reason for each chain the filters dropped."""

    chains: list[ProteinChain]
    dropped: list[str]


def parse_structure(
    path: Path | str,
    options: ParseOptions | None = None,
    entry: str | None = None,
    wanted: Sequence[str] | None = None,
) -> ParsedFile:
    """Usable chains of one file, or ``StructureSkip`` saying why there are none.

    ``entry`` names the chains (``<entry>_<chain>``); it defaults to the file stem.
    """
    path = Path(path)
    options = options or ParseOptions()
    entry = entry or strip_suffixes(path.name)[0]
    if not path.is_file():
        raise StructureSkip("not a file")
    atoms = read_atoms(path, options.altloc)
    if atoms.array_length() == 0:
        raise StructureSkip("no atoms in the first model")
    candidates = chains_from_atoms(entry, atoms)
    if not candidates:
        raise StructureSkip("no protein chain (no amino-acid residues)")
    chains = select_chains([c for _, c in candidates], entry, wanted)
    if not chains:
        found = ", ".join(c.id for _, c in candidates)
        raise StructureSkip(f"none of the selected chains is in the file (found {found})")
    usable, reasons = [], []
    for chain in chains:
        reason = _chain_filter_reason(chain, options)
        if reason is None:
            usable.append(chain)
        else:
            reasons.append(f"chain {chain.id.rsplit('_', 1)[1]}: {reason}")
    if not usable:
        raise StructureSkip("no usable chain: " + "; ".join(reasons))
    return ParsedFile(usable, reasons)

