"""`ngrpo demo`, `ngrpo pretrain` and `ngrpo distill`: the built-in tasks' commands (digits, words, the few-step
student). Everything heavy is imported inside the commands, so `ngrpo --help` stays fast."""

from __future__ import annotations


def demo_command(args) -> None:
    from neighbor_grpo.builtin.demo import run_demo
    from neighbor_grpo.builtin.words_demo import run_words_demo

    run = run_words_demo if args.task == "words" else run_demo
    run(args.out, overwrite=args.overwrite, overrides=args.overrides, progress=not args.no_progress,
        threads=args.threads)


def pretrain_command(args) -> None:
    from neighbor_grpo.runs.ownership import check_folder_target
    from neighbor_grpo.builtin.pretrain import BUILTIN_MODELS, ClassifierSettings, ensure_base_model, ensure_classifier
    from neighbor_grpo.runs.runfolder import RunFolder
    import shutil

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: expected a count of training steps >= 1, got {args.steps}")
    if args.classifier_epochs < 1:
        raise ValueError(f"--classifier-epochs: expected a count of epochs >= 1, got {args.classifier_epochs}")
    if args.model == "words":
        return pretrain_words_command(args)
    if not 0.0 <= args.label_noise <= 1.0:
        raise ValueError(f"--label-noise: expected a share in [0, 1], got {args.label_noise}")
    if args.out:  # refused before minutes of pretraining, not after
        check_folder_target(args.out, args.overwrite)
    classifier_dir, accuracy = ensure_classifier(progress=not args.no_progress, settings=ClassifierSettings(epochs=args.classifier_epochs))
    settings = BUILTIN_MODELS[args.model](label_noise=args.label_noise)
    settings.steps = args.steps or settings.steps
    base_dir = ensure_base_model(progress=not args.no_progress, settings=settings)
    print(f"reward classifier: {classifier_dir} (held-out accuracy {accuracy:.4f})")
    print(f"base model:        {base_dir}")
    if args.out:
        with RunFolder(args.out, overwrite=args.overwrite, kind="pretrain") as folder:
            for source, name in ((base_dir, "base"), (classifier_dir, "reward")):
                shutil.copytree(source, folder.path / name)
            out = folder.commit()
        print(f"copied to {out}/base (a --checkpoint for sample/eval) and {out}/reward (digit_prob kwargs.path)")


def pretrain_words_command(args) -> None:
    """`ngrpo pretrain --model words`: the builtin:words base (cached), its legibility against CPU time printed."""
    from neighbor_grpo.builtin.words_pretrain import WordsPretrainSettings, default_words_dir, pretrain_words
    from neighbor_grpo.runs.ownership import check_folder_target
    import json

    if args.out:  # refused before minutes of pretraining, not after
        check_folder_target(args.out, args.overwrite)
    settings = WordsPretrainSettings()
    settings.max_steps = args.steps or settings.max_steps
    folder = default_words_dir(settings)
    if not (folder / "pretrain.json").is_file():
        pretrain_words(settings, folder, progress=not args.no_progress)
    record = json.loads((folder / "pretrain.json").read_text())
    final = record["heldout_final"]
    print(f"base model: {folder}")
    print(f"held-out words, groups of {final['samples_per_word']}: exact match {final['exact']:.3f}, mean reward "
          f"{final['reward']:.3f}, groups with reward spread {final['groups_with_spread']:.3f}; stopped at step "
          f"{record['stopped_at']} after {record['train_cpu_s']:.0f} CPU-s of training")
    if args.out:
        print(f"copied to {copy_base_into_run(folder, args, 'pretrain')}/base (a --checkpoint for sample/eval)")


def distill_command(args) -> None:
    import json as json_module

    from neighbor_grpo.builtin.distill import ReflowSettings, ensure_reflow_model
    from neighbor_grpo.runs.ownership import check_folder_target

    for name in ("pairs", "teacher_steps", "train_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.out:  # refused before minutes of distillation, not after
        check_folder_target(args.out, args.overwrite)
    settings = ReflowSettings(pairs=args.pairs, teacher_steps=args.teacher_steps, train_steps=args.train_steps,
                              seed=args.seed)
    folder = ensure_reflow_model(progress=not args.no_progress, settings=settings)
    meta = json_module.loads((folder / "model.json").read_text())
    print(f"few-step student: {folder} ({meta['reflow_seconds']} s to build)")
    for steps, error in meta["few_step_error"].items():
        print(f"  {steps} Euler step(s): mean squared distance to the teacher's {args.teacher_steps}-step samples "
              f"{error['teacher']:.4f} (teacher) -> {error['student']:.4f} (student)")
    if args.out:
        print(f"copied to {copy_base_into_run(folder, args, 'distill')}/base (a model.path or --checkpoint)")


def copy_base_into_run(folder, args, kind: str):
    """A built model folder copied to `args.out`/base, a run folder of `kind` written beside and renamed into place."""
    import shutil

    from neighbor_grpo.runs.runfolder import RunFolder

    with RunFolder(args.out, overwrite=args.overwrite, kind=kind) as run:
        shutil.copytree(folder, run.path / "base")
        return run.commit()
