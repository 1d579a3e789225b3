"""Errors a user can fix, apart from bugs.

Every error raised for bad input -- a recipe, a data file, a model spec, a checkpoint or run
directory, a run key, a spent budget, a layer no per-sample rule covers -- derives from
:class:`UserError`; its message names the key or file and the fix.  ``dptrain`` prints such an
error as one ``error: ...`` line and anything else as a bug, with its traceback.  The concrete
classes keep their historical builtin bases (``ValueError``, ``RuntimeError``) so that callers
catching those still do.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
"""``dptrain``'s exit code for a :class:`UserError` (argparse's for a bad argument, too)."""


class UserError(Exception):
    """Bad input the user can fix; the message names the fix."""


class RecipeError(UserError, ValueError):
    """A recipe that cannot run; the message names the key and the fix."""


class InputError(UserError, ValueError):
    """Other bad input: a command-line value, a run that cannot be audited, a client setting."""


class ModelSpecError(UserError, ValueError):
    """A model spec that cannot be resolved (:func:`dptrain.models.load_model_and_tokenizer`)."""


class InputWarning(UserWarning):
    """Input that looks wrong but does not stop the run (dropped empty records, records that
    look split); ``dptrain`` prints it as one ``warning: ...`` line."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``state`` says what is on disk; with a ``run_dir``, the message
    ends with the command that resumes it (``command``: the one that was running)."""

    def __init__(self, state: str, run_dir: object = None, command: str | None = None) -> None:
        super().__init__(state)
        self.state, self.run_dir, self.command = state, run_dir, command

    @property
    def message(self) -> str:
        if self.run_dir is None:
            return self.state
        return f"{self.state}. Continue with: {self.command or 'dptrain train RECIPE'} --resume {self.run_dir}"
