"""The shipped default policy: a data file (default_policy.yaml, package data) that loads to exactly the
policy that was written in code before, its YAML dump round trip, and the shell command."""

from __future__ import annotations

import json
from pathlib import Path

import tomllib
import yaml

from pipeline.prompt.safety.__main__ import main
from pipeline.prompt.safety.policy import DEFAULT_POLICY, load_policy

# The default as it was written in pipeline/prompt/safety/policy.py before it became a data file.
SHIPPED_BEFORE_THE_DATA_FILE = {
    "version": 1,
    "description": "reelforge's shipped default prompt policy (modest; supply your own)",
    "allow": ["al gore", "gore tex", "goretex", "gore vidal", "suicide squad",
              "suicide door", "suicide prevention"],
    "categories": {
        "sexual_minors": {
            "description": "sexual content involving minors: blocked outright, or by a minor term "
                           "together with a sexual term anywhere in the prompt or caption",
            "terms": ["csam", "child porn*", "child sexual abuse", "child abuse material", "loli*", "shota*",
                      "jailbait", "pedophil*", "paedophil*"],
            "all_of": [
                ["child", "children", "kid", "kiddie", "minor", "underage", "under age", "toddler", "infant",
                 "baby", "preteen", "pre teen", "teen", "teenage*", "schoolgirl", "schoolboy", "young girl",
                 "young boy", "little girl", "little boy", "year old girl", "year old boy"],
                ["nude", "naked", "nudity", "sex", "sexual*", "sexy", "porn*", "erotic*", "nsfw", "lingerie",
                 "topless", "undress*", "stripper", "striptease", "stripping", "seductive*", "intercourse",
                 "molest*", "groping", "fondl*"],
            ],
        },
        "graphic_violence": {
            "description": "graphic violence and gore",
            "terms": ["gore", "gory", "graphic violence", "dismember*", "disembowel*", "decapitat*", "behead*",
                      "eviscerat*", "mutilat*", "severed head", "severed limb*", "entrails", "guts spill*",
                      "blood soaked", "bloodbath", "blood bath", "torture porn", "snuff film", "snuff video",
                      "massacre*", "school shooting", "mass shooting", "execution video", "flayed", "skinned alive",
                      "burned alive", "burnt alive"],
        },
        "self_harm": {
            "description": "suicide and self-harm",
            "terms": ["suicide", "suicidal", "self harm", "self harming", "selfharm", "self injury",
                      "kill myself", "killing myself", "kill yourself", "kys", "cutting myself", "cut myself",
                      "slit* wrist*", "hang myself", "hanging myself", "end my life", "overdos* on purpose",
                      "pro ana", "thinspo*"],
        },
        "hate": {
            "description": "hate symbols and calls to violence against groups (no slur list is shipped)",
            "terms": ["heil hitler", "sieg heil", "white power", "white supremac*", "ethnic cleansing",
                      "race war", "kkk", "ku klux klan", "neo nazi*", "nazi propaganda", "1488", "gas the jews",
                      "final solution"],
            "all_of": [
                ["kill all", "exterminate", "exterminating", "gas all", "lynching", "lynch mob", "death to"],
                ["jews", "muslims", "christians", "blacks", "whites", "asians", "arabs", "gays", "lesbians",
                 "immigrants", "refugees", "hindus", "sikhs", "roma", "gypsies", "trans people", "women"],
            ],
        },
        "impersonation": {
            "description": "deepfakes and realistic depictions of real public figures (an illustrative list "
                           "of names; add your own)",
            "terms": ["deepfake*", "deep fake*", "face swap*", "faceswap*", "donald trump", "joe biden",
                      "kamala harris", "barack obama", "vladimir putin", "xi jinping", "volodymyr zelensky",
                      "narendra modi", "emmanuel macron", "king charles", "pope francis", "pope leo", "elon musk",
                      "taylor swift", "mark zuckerberg", "oprah winfrey"],
        },
    },
}


def test_the_data_file_is_the_policy_that_was_in_code():
    assert DEFAULT_POLICY == SHIPPED_BEFORE_THE_DATA_FILE
    # the same order too (categories are checked in order; the dump prints in order)
    assert json.dumps(DEFAULT_POLICY) == json.dumps(SHIPPED_BEFORE_THE_DATA_FILE)


def test_the_data_file_ships_as_package_data():
    pyproject = tomllib.loads((Path(__file__).parents[4] / "pyproject.toml").read_text())
    assert "prompt/safety/default_policy.yaml" in pyproject["tool"]["setuptools"]["package-data"]["pipeline"]


def test_default_spec_and_dump_round_trip(tmp_path):
    assert load_policy("default").check("gore").category == "graphic_violence"
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(DEFAULT_POLICY, sort_keys=False))
    dumped = load_policy(str(path))
    assert [c.name for c in dumped.categories] == list(DEFAULT_POLICY["categories"])
    assert main(["gore"]) == 1 and main(["a red circle"]) == 0
