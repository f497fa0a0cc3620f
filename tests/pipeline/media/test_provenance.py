"""Provenance: the invisible watermark on real renders, MP4/PNG tags, C2PA signing, `reel verify`.

The detection and false-positive bars run on real default-model renders made once per module at 1
thread. For the test's speed they use 4 sampling steps (the model's default is 20) and 8 frames
(default 16): fewer frames give the detector less to average, so that is the harder case;
bench/watermark.py measures the model's own settings on more clips. C2PA certificates (a CA and an
ES256 leaf) are generated here with `cryptography`; nothing leaves the machine.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.shapes import world as sw
from pipeline.media.encode import decode_mp4, encode_mp4, encode_png
from pipeline.media.provenance import (
    C2paConfig,
    Provenance,
    ProvenanceError,
    UnreadableInput,
    c2pa_config_from_env,
    caption_sha256,
    read_c2pa,
    read_provenance,
    read_tags,
    sign_c2pa,
)
from pipeline.media.watermark import THRESHOLD, detect_watermark, embed_watermark

ROOT = Path(__file__).resolve().parents[3]
SIZES = [(64, 64)] * 5 + [(96, 64), (64, 96), (32, 32)]  # cycled over the 40 renders
N_RENDERS = 40
MODEL_INFO = {"name": "reelforge-shapes", "version": "0.2.0", "weights_sha256": "ab" * 32}


def _psnr(a, b) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="module")
def generator():
    from models.interface import load_generator

    return load_generator("default", num_threads=1)


@pytest.fixture(scope="module")
def renders(generator):
    """40 real renders of varied shapes-world captions, sizes and seeds (uint8 T x H x W x 3)."""
    from models.interface import RenderRequest

    scenes = sw.sample_scenes(7, N_RENDERS, include_held_out=True)
    out = []
    for i, scene in enumerate(scenes):
        w, h = SIZES[i % len(SIZES)]
        req = RenderRequest(caption=sw.canonical_caption(scene), width=w, height=h, frames=8, fps=8, seed=100 + i,
                            steps=4, guidance=generator.limits.default_guidance)
        out.append(generator.generate([req])[0].frames)
    return out


@pytest.fixture(scope="module")
def encoded(renders):
    """(marked, unmarked) MP4 round trips of every render through encode_mp4/decode_mp4 (CRF 18)."""
    marked = [decode_mp4(encode_mp4(embed_watermark(f), 8)) for f in renders]
    plain = [decode_mp4(encode_mp4(f, 8)) for f in renders]
    return marked, plain


# --------------------------------------------------------------------------------------------
# Watermark


def test_detection_rate_on_real_renders_after_h264(encoded):
    scores = np.array([detect_watermark(f).score for f in encoded[0]])
    rate = float(np.mean(scores >= THRESHOLD))
    assert rate >= 0.95, f"detection rate {rate:.3f}, scores {np.round(np.sort(scores)[:5], 2)}"


def test_false_positive_rate_on_unmarked_clips_and_images(encoded):
    import skimage.data
    from PIL import Image

    unmarked = list(encoded[1])  # the same 40 renders, without the mark
    for i, scene in enumerate(sw.sample_scenes(11, 10)):
        unmarked.append(sw.render_scene(scene, width=64, height=64, frames=8, rng=i))
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"):
        img = getattr(skimage.data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        unmarked.append(img)  # a still at its own size
        unmarked.append(np.asarray(Image.fromarray(img).resize((128, 96), Image.BICUBIC)))
    assert len(unmarked) >= 40
    scores = np.array([detect_watermark(f).score for f in unmarked])
    fp = float(np.mean(scores >= THRESHOLD))
    assert fp <= 0.05, f"false-positive rate {fp:.3f}, highest scores {np.round(np.sort(scores)[-5:], 2)}"
    # the bound behind the threshold says z is at most a few units on unmarked content
    assert scores.max() < THRESHOLD - 1.5


def test_watermark_is_invisible_and_deterministic(renders):
    psnrs = [_psnr(embed_watermark(f), f) for f in renders]
    assert min(psnrs) >= 38.0, f"PSNR {min(psnrs):.2f} dB"
    f = renders[0]
    a, b = embed_watermark(f), embed_watermark(f.copy())
    assert a.dtype == np.uint8 and a.shape == f.shape
    assert np.array_equal(a, b)
    assert encode_mp4(a, 8) == encode_mp4(b, 8)
    assert not np.array_equal(a, f)


def test_watermark_key_matters(renders, monkeypatch):
    f = renders[0]
    marked = embed_watermark(f)
    assert detect_watermark(marked).detected
    monkeypatch.setenv("REEL_WATERMARK_KEY", "another key")
    assert not detect_watermark(marked).detected
    assert detect_watermark(embed_watermark(f)).detected  # the env key marks and finds its own


def test_watermark_survives_crf28_and_downscale(renders):
    from PIL import Image

    clips = [r for r in renders if min(r.shape[1:3]) >= 64][:8]
    for f in clips:
        marked = embed_watermark(f)
        assert detect_watermark(decode_mp4(encode_mp4(marked, 8, crf=28))).detected
        t, h, w, _ = marked.shape
        small = np.stack([np.asarray(Image.fromarray(x).resize((w // 2, h // 2), Image.BICUBIC))
                          for x in decode_mp4(encode_mp4(marked, 8))])
        assert detect_watermark(decode_mp4(encode_mp4(small, 8))).detected


def test_watermark_on_odd_sizes_and_stills():
    rng = np.random.default_rng(0)
    for h, w in ((32, 1920), (1080, 1920), (58, 34), (200, 64)):
        base = np.full((2, h, w, 3), 120, np.uint8)
        base[:, h // 4: h // 2, w // 4: w // 2] = (220, 40, 40)
        marked = embed_watermark(base)
        assert detect_watermark(marked).detected, (h, w)
        assert not detect_watermark(base).detected
    still = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert embed_watermark(still).shape == still.shape
    with pytest.raises(ValueError, match="uint8"):
        embed_watermark(np.zeros((2, 64, 64, 3), np.float32))


# --------------------------------------------------------------------------------------------
# Tags


def test_tags_round_trip_mp4_and_png(renders):
    caption = ("A red circle moves from the left to the right of the frame on a plain black background. "
               "The camera is static.")
    rec = Provenance.for_clip(MODEL_INFO, caption, seed=42)
    tags = rec.tags()
    assert tags["caption_sha256"] == caption_sha256(caption) and tags["seed"] == "42"
    assert tags["generator"].startswith("reelforge ") and tags["model_sha256"] == "ab" * 32
    mp4 = encode_mp4(embed_watermark(renders[0]), 8, metadata={"title": "clip", "comment": caption, **tags})
    back = read_tags(mp4)
    assert back == {"title": "clip", "comment": caption, **tags}
    plain = {"title": "t", "comment": "c"}
    assert read_tags(encode_mp4(renders[0], 8, metadata=plain)) == plain
    png = encode_png(embed_watermark(renders[0][0]), {"comment": caption, **tags})
    assert read_tags(png) == {"comment": caption, **tags}
    report = read_provenance(png)
    assert report["watermark"]["detected"] and report["caption_matches"] is True and report["format"] == "png"
    report = read_provenance(mp4)
    assert report["ok"] and report["tags"]["model"] == "reelforge-shapes" and report["c2pa"] is None


# --------------------------------------------------------------------------------------------
# C2PA


def _name(cn):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "reelforge tests")])


def _cert(subject, issuer, public_key, signing_key, *, ca: bool, issuer_key=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = (b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False))
    if issuer_key is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False)
    return b.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A test CA, an ES256 signer it issued, and a self-signed ES256 certificate: PEM paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("c2pa")
    pem = serialization.Encoding.PEM
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("reelforge test CA"), _name("reelforge test CA"), ca_key.public_key(), ca_key, ca=True)
    leaf = _cert(_name("reelforge signer"), ca.subject, key.public_key(), ca_key, ca=False,
                 issuer_key=ca_key.public_key())
    selfsigned = _cert(_name("self"), _name("self"), key.public_key(), key, ca=False)
    (d / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (d / "chain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "selfsigned.pem").write_bytes(selfsigned.public_bytes(pem))
    return d


@pytest.fixture(scope="module")
def signed_clip(renders, certs, tmp_path_factory):
    caption = "A blue square moves up on a plain gray background."
    rec = Provenance.for_clip(MODEL_INFO, caption, seed=7)
    mp4 = encode_mp4(embed_watermark(renders[1]), 8, metadata={"title": "c", "comment": caption, **rec.tags()})
    signed = sign_c2pa(mp4, rec, config=C2paConfig(key=str(certs / "key.pem"), cert=str(certs / "chain.pem")))
    path = tmp_path_factory.mktemp("signed") / "clip.mp4"
    path.write_bytes(signed)
    return mp4, signed, path


def test_c2pa_sign_and_read_back(signed_clip, certs, monkeypatch):
    mp4, signed, _ = signed_clip
    assert signed != mp4 and len(signed) > len(mp4)
    monkeypatch.delenv("REEL_C2PA_TRUST_ANCHORS", raising=False)
    m = read_c2pa(signed)
    assert m["valid"] and m["state"] == "Valid" and not m["failures"], m
    assert m["signer"]["common_name"] == "reelforge signer"
    assert m["claim_generator"][0].startswith("reelforge")
    created = {"action": "c2pa.created",
               "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"}
    assert created in m["actions"]
    assert m["generation"]["model"] == {"name": "reelforge-shapes", "version": "0.2.0", "weights_sha256": "ab" * 32}
    assert m["generation"]["caption_sha256"] == caption_sha256("A blue square moves up on a plain gray background.")
    # signing keeps the tags, the frames and the mark
    assert read_tags(signed) == read_tags(mp4)
    assert np.array_equal(decode_mp4(signed), decode_mp4(mp4))
    # with the CA as a trust anchor the signer is trusted
    monkeypatch.setenv("REEL_C2PA_TRUST_ANCHORS", str(certs / "ca.pem"))
    assert read_c2pa(signed)["state"] == "Trusted"
    # a changed byte in the video data breaks the manifest's hash
    mdat = signed.rindex(b"mdat")
    tampered = bytearray(signed)
    tampered[mdat + 40] ^= 0xFF
    t = read_c2pa(bytes(tampered))
    assert not t["valid"], t
    assert read_c2pa(mp4) is None


def test_c2pa_png_still(renders, certs):
    rec = Provenance.for_clip(MODEL_INFO, "a still", seed=1)
    png = encode_png(embed_watermark(renders[0][0]), rec.tags())
    signed = sign_c2pa(png, rec, mime_type="image/png",
                       config=C2paConfig(key=str(certs / "key.pem"), cert=str(certs / "chain.pem")))
    report = read_provenance(signed)
    assert report["ok"] and report["c2pa"]["valid"] and report["tags"]["model"] == "reelforge-shapes"


def test_c2pa_configuration_from_env(certs, monkeypatch):
    for name in ("REEL_C2PA_KEY", "REEL_C2PA_CERT", "REEL_C2PA_ALG", "REEL_C2PA_TSA_URL"):
        monkeypatch.delenv(name, raising=False)
    rec = Provenance.for_clip(MODEL_INFO, "x")
    data = encode_mp4(np.full((2, 32, 32, 3), 90, np.uint8), 8)
    assert c2pa_config_from_env() is None
    assert sign_c2pa(data, rec) is data  # not configured: unchanged
    monkeypatch.setenv("REEL_C2PA_KEY", str(certs / "key.pem"))
    with pytest.raises(ProvenanceError, match="set REEL_C2PA_CERT"):
        sign_c2pa(data, rec)
    monkeypatch.setenv("REEL_C2PA_CERT", f"file://{certs / 'chain.pem'}")
    assert read_c2pa(sign_c2pa(data, rec))["valid"]
    monkeypatch.setenv("REEL_C2PA_ALG", "rsa")
    with pytest.raises(ProvenanceError, match="REEL_C2PA_ALG"):
        sign_c2pa(data, rec)
    monkeypatch.setenv("REEL_C2PA_ALG", "ps256")  # an EC key with an RSA algorithm
    with pytest.raises(ProvenanceError) as e:
        sign_c2pa(data, rec)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("REEL_C2PA_ALG", "es256")
    monkeypatch.setenv("REEL_C2PA_CERT", str(certs / "selfsigned.pem"))  # c2pa refuses self-signed signers
    with pytest.raises(ProvenanceError, match="not self-signed") as e:
        sign_c2pa(data, rec)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("REEL_C2PA_CERT", str(certs / "missing.pem"))
    with pytest.raises(ProvenanceError, match="cannot read"):
        sign_c2pa(data, rec)


# --------------------------------------------------------------------------------------------
# reel verify


def _reel(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_reel_verify_exit_codes(signed_clip, renders, certs, tmp_path):
    _, _, marked = signed_clip
    plain = tmp_path / "plain.mp4"
    plain.write_bytes(encode_mp4(renders[2], 8))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)

    r = _reel(str(marked), "--json", env={"REEL_C2PA_TRUST_ANCHORS": str(certs / "ca.pem")})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["watermark"]["detected"] and report["c2pa"]["state"] == "Trusted"
    assert report["tags"]["model_sha256"] == "ab" * 32 and report["caption_matches"] is True

    r = _reel(str(marked), str(plain))
    assert r.returncode == 1, r.stderr
    assert "DETECTED" in r.stdout and "not detected" in r.stdout and "signed by" in r.stdout

    r = _reel(str(junk))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "reel verify:" in r.stderr, r.stderr
    with pytest.raises(UnreadableInput):
        read_provenance(junk)
