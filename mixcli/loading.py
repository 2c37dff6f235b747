"""Loading a whole model with transformers where a plugin needs one in memory (router
initialisation, tuning, adaptation): every weight must come from the files. transformers
initialises missing or mis-shaped weights randomly and only logs it; here that is an error
naming the tensors, since any score or router computed from such a model would be noise."""

from __future__ import annotations

from .errors import MixcliError, first_line


def from_pretrained(model_class, path, where: str, **kwargs):
    """``model_class.from_pretrained(path, **kwargs)`` in eval mode, or a one-line MixcliError
    when transformers cannot load the folder or leaves a weight missing or re-initialised."""
    import transformers

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # its load report would repeat the error below
    transformers.logging.disable_progress_bar()  # a bar per load, inside mixcli's own output
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    except MixcliError:
        raise
    except Exception as error:  # transformers' errors for unloadable folders vary (OSError, ValueError, ...)
        raise MixcliError(f"{where}: transformers cannot load the model in {path} ({first_line(error)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    missing = sorted(set(info.get("missing_keys") or ()))
    mismatched = sorted(entry[0] if isinstance(entry, tuple) else entry for entry in info.get("mismatched_keys") or ())
    for names, what in ((missing, "has no stored weight for {}"),
                        (mismatched, "stores {} in a shape its config.json does not give")):
        if names:
            shown = ", ".join(f"'{name}'" for name in names[:3]) + (f" and {len(names) - 3} more"
                                                                   if len(names) > 3 else "")
            them = "it" if len(names) == 1 else "them"
            raise MixcliError(f"{where}: the model in {path} {what.format(shown)} (transformers would initialise "
                              f"{them} randomly); re-save the complete model with save_pretrained")
    return model.eval()
