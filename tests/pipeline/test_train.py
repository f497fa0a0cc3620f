"""`reel train` (pipeline/train.py, the command line of models/training/): a wrong start is refused in
one line before anything is written, and a conditioning mix of its own is taken."""


def test_reel_train_refuses_a_wrong_start_in_one_line(tmp_path, capsys):
    from pipeline.cli import main

    for args, reason in ((["--init-from", "nosuch"], "no model config at 'nosuch'"),
                         (["--model", "tiny", "--init-from", "default", "--vae-steps", "0"], "autoencoder differs"),
                         (["--model", "tiny", "--init-from", "default"], "DiT differs"),
                         (["--timestep-shift", "0"], "must be above 0"),
                         (["--high-noise-share", "1"], "a share in [0, 1)"),
                         (["--cond-mix", "extend"], "write TASK=SHARE pairs"),
                         (["--cond-mix", "extend=0.6,extend_backward=0.6"], "adding up to at most 1"),
                         (["--cond-mix", "backwards=0.3"], "(unknown: backwards)"),
                         (["--vae-decoder-only"], "give --init-from MODEL")):
        assert main(["train", "--out", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("reel train: ") and reason in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_reel_train_takes_a_conditioning_mix_of_its_own():
    import argparse

    from pipeline.train import add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    assert config_from_args(p.parse_args(["--out", "x"])).cond_mix is None  # models.sampler's default
    cfg = config_from_args(p.parse_args(["--out", "x", "--cond-mix", "extend=0.2, extend_backward=0.35"]))
    assert cfg.cond_mix == {"extend": 0.2, "extend_backward": 0.35}
