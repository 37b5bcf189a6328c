"""
What every script shares: the one-line error, the command-line wrapper that prints it, files written
whole or not at all, and a dataset folder's meta.json.

Design choices:
- One exception for the user's mistakes, UserError: bad settings, bad data, a missing file. Its
  message says what is wrong and what to do. run_cli prints it as one line on stderr and exits 2;
  --debug (in any script) shows the traceback instead. Anything else is a bug and keeps its traceback.
- Files are written beside their final name, flushed to disk and renamed into place, so a crash
  leaves the old file or the new one (write_json_atomic, replace_durably).
- meta.json is read in one place (read_meta) with one style of error, and written in one
  (write_meta); token_dtype is the one rule for how token ids are stored (uint16 when they fit).
- A folder that a run writes into is held by it (hold_folder): an advisory lock that the kernel
  releases when the process ends, however it ends, so a second run is refused and a killed one never
  blocks the next.
- OpenMP threads that wait for work sleep after a short spin (yield_idle_cores, called by train.py
  and sample.py before torch loads OpenMP), so that a CPU shared with other processes slows a run by
  its share of the cores, not many times over.
This module imports nothing of the repository's: every other module may import it.
"""
import argparse
import json
import os
import sys

import numpy as np


class UserError(Exception):
    """A problem with the user's input or settings; shown as one line (what is wrong, what to do)."""


def yield_idle_cores():
    """Before torch is imported: GNU OpenMP's waiting threads spin 1,000 times, not 300,000, before they
    sleep. On two cores shared with another busy process the default made a training step 4-15x slower
    and decoding up to 60x; with 1,000 both run at about half their idle speed, and an idle machine
    loses a few percent (README, "A busy CPU"). OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user wins."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "1000"


def cpu_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def first_line(e):
    """An exception's message cut to its first line (or its type's name), for a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def wants_debug(argv):
    return any(a == "--debug" or a.lower() == "--debug=true" for a in argv)


def run_cli(main, argv=None, interrupted="interrupted"):
    """main(argv) with the user's errors as one line and exit code 2 (--debug: the traceback).
    Returns the exit code: main's own (None is 0), 2 on a UserError, 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = main(argv)
    except UserError as e:
        if wants_debug(argv):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return code or 0


def description(doc):
    """A script's --help description: the first paragraph of its docstring, as one line."""
    return " ".join(doc.strip().split("\n\n")[0].split())


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse help where every option shows its default, once."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts that take options (prepare.py, plot.py, ...): defaults in --help,
    --debug, and a bad option as one line with exit code 2, like every other error."""

    def __init__(self, **kw):
        super().__init__(formatter_class=DefaultsHelpFormatter, **kw)
        self.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")

    def error(self, message):
        raise UserError(message)


# -----------------------------------------------------------------------------------------------
# files written whole or not at all

def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def fsync_dir(path):
    """Make a rename in this folder durable; not every system can open a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(write, path):
    """write(f) into a temporary file beside path, flush it to disk, then rename it to path."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def download(url, path, offline, log=None):
    """Fetch url into path, whole or not at all (replace_durably); a failure is one line ending in
    `offline`, what to do without the network. Progress goes to log (default stdout)."""
    import urllib.request
    print(f"downloading {url}", file=log or sys.stdout)

    def fetch(f):
        with urllib.request.urlopen(url, timeout=30) as r:
            f.write(r.read())
    try:
        replace_durably(fetch, path)
    except OSError as e:
        raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}); offline, {offline}") from None


def read_text_file(path, what):
    """The text of a UTF-8 file, or one line saying why it cannot be read."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; convert it to UTF-8 first") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({e.strerror})") from None


def make_folder(path, what):
    """os.makedirs, with a refusal (path is a file, under a file, not writable) as one line naming `what`."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make {what} {path} ({e.strerror or first_line(e)}); pass a folder you can "
                        f"write to") from None


def write_json_atomic(path, obj):
    replace_durably(lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8")), path)


LOCK_FILE = "run.lock"


def hold_folder(path, holder):
    """Lock folder path for this process (path/run.lock, flock); returns the open lock file, whose
    closing releases it (so does the process's end). holder is written into the lock file, to name this
    run to a second one, which gets a UserError. Systems without flock (Windows) lock nothing."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(os.path.join(path, LOCK_FILE), "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{path} is in use by another run ({other}); wait for it to end, or train into another "
                        f"--out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(holder + "\n")
    f.flush()
    return f


# -----------------------------------------------------------------------------------------------
# a dataset folder's meta.json

def token_dtype(vocab_size):
    """How token ids are stored: uint16 when the vocabulary fits, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def read_meta(data_dir):
    """The meta.json of a dataset folder made by prepare.py, or a UserError saying what to do."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        what = "has no meta.json" if os.path.isdir(data_dir) else "does not exist"
        raise UserError(f"dataset folder {data_dir} {what}; build it with prepare.py")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not readable JSON ({type(e).__name__}); re-run prepare.py") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), dict):
        raise UserError(f"{path} has no \"tokenizer\" entry; re-run prepare.py")
    return meta


def write_meta(out_dir, meta):
    write_json_atomic(os.path.join(out_dir, "meta.json"), meta)
