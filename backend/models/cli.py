"""``python -m backend models list | check | download NAME``.

- ``list``: every profile and where each of its models comes from.
- ``check [--profile P] [--load]``: what is present and what is missing (starter files are verified against the
  sha256 in ``manifest.json``; ``--load`` also loads each present model). Exit 0 when everything is present, 1 when
  something is missing.
- ``download clip|diffusion|shap-e|shap-e-img2img|all``: fetch the public weights of the ``pretrained`` profile into
  the Hugging Face cache (progress bars from huggingface_hub); ``shap-e`` fetches both Shap-E pipelines (text and
  image -> 3D, the profile's 3D prior). Offline, a clear paragraph names the file and this command.
"""

from __future__ import annotations

import argparse
import sys

from backend.errors import InputError, ModelUnavailable, StepstoneError
from backend.models import registry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend models", description="model weights of the profiles")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="profiles and where their models come from")
    c = sub.add_parser("check", help="what is present and what is missing")
    c.add_argument("--profile", default=None, help="starter (default), pretrained, tiny or tiny-pretrained")
    c.add_argument("--load", action="store_true", help="also load every present model")
    d = sub.add_parser("download", help="fetch public weights of the pretrained profile")
    d.add_argument("name", choices=["clip", "diffusion", "shap-e", "shap-e-img2img", "all"])
    return p


def cmd_list() -> int:
    for name in registry.PROFILES:
        prof = registry.load_profile(name)
        print(f"{name}:")
        for kind, st in prof.components().items():
            mark = "present" if st.present else "missing"
            public = "" if st.public else "  (no public weights)"
            print(f"  {kind:<10} {mark:<8} {st.source}{public}")
    return 0


def cmd_check(profile_name: str | None, load: bool) -> int:
    prof = registry.load_profile(profile_name)
    print(f"profile {prof.name}:")
    missing = 0
    for kind, st in prof.components().items():
        ok, detail = st.present, st.detail
        if ok and prof.name == "starter":
            ok, detail = registry.verify_manifest_entry(kind)
        if ok and load:
            try:
                prof.load(kind)
                detail += "; loads"
            except StepstoneError as exc:
                ok, detail = False, exc.message
        if ok:
            print(f"  ok       {kind:<10} {detail}")
        else:
            missing += 1
            fetch = f"  -> run `{st.fetch}`" if st.fetch else ""
            print(f"  MISSING  {kind:<10} {detail}{fetch}")
    caps = prof.capabilities()
    print("workflows:")
    for wf, cap in caps.items():
        state = "available" if cap["available"] else "unavailable"
        print(f"  {wf:<15} {state}" + ("" if cap["available"] else f": {cap['reason']}"))
    return 1 if missing else 0


def cmd_download(name: str) -> int:
    from backend.models import hub

    from backend.models import shap_e

    targets = {"all": ["clip", "diffusion", "shap-e", "shap-e-img2img"],
               "shap-e": ["shap-e", "shap-e-img2img"]}.get(name, [name])
    for t in targets:
        if t in shap_e.SHAP_E_KINDS:
            mid = shap_e.model_id(t)
            path = hub.download_shap_e(mid, t)
            print(f"{t}: {mid} -> {path}")
        elif t == "clip":
            model, tag = registry.PRETRAINED_CLIP
            path = hub.download_clip(model, tag)
            print(f"clip: {model} / {tag} -> {path}")
        else:
            mid = registry.sd_model_id()
            path = hub.download_diffusers(mid)
            print(f"diffusion: {mid} -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.action == "list":
            return cmd_list()
        if args.action == "check":
            return cmd_check(args.profile, args.load)
        return cmd_download(args.name)
    except (InputError, ModelUnavailable) as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
