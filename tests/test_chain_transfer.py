"""The QSM chain's transfer of a deep-band change (alsiron.qsm.transfer and the gtmrc
index): the perturbation is the phase the field accrues, the rerun is the same chain, and
``alsiron qsm`` records the transfer where a finer label image gives the bands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from alsiron.cli import cli
from alsiron.cohort.records import TRANSFER_CORRECTED_INDEX
from alsiron.io import bids as ingest
from alsiron.qsm.chain import process_series
from alsiron.qsm.inversion import phase_per_ppm
from alsiron.qsm.transfer import add_field, chain_response
from alsiron.sim.phantom import write_dataset
from alsiron.volume import MegreSeries


def test_add_field_adds_the_phase_the_field_accrues():
    rng = np.random.default_rng(0)
    shape, tes = (6, 5, 4), np.array([0.005, 0.015, 0.025])
    phase = rng.uniform(-np.pi, np.pi, (3, *shape)).astype(np.float32)
    series = MegreSeries(magnitude=np.ones((3, *shape), np.float32), phase=phase,
                         echo_times=tes, field_strength=3.0, affine=np.eye(4),
                         voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0),
                         subject="01", session="")
    field = rng.normal(0.0, 0.2, shape)
    out = add_field(series, field)
    for e, te in enumerate(tes):
        step = np.angle(np.exp(1j * (out.phase[e] - phase[e])))
        want = np.angle(np.exp(1j * phase_per_ppm(3.0, te) * field))
        assert np.allclose(step, want, atol=2e-5)
        assert np.all(np.abs(out.phase[e]) <= np.pi + 1e-6)
    assert out.magnitude is series.magnitude
    unwrapped = add_field(series, field, phase_unwrapped=True)
    assert np.allclose(unwrapped.phase[2] - phase[2], phase_per_ppm(3.0, 0.025) * field,
                       atol=2e-5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("transfer") / "bids", subjects=1,
                         sessions=1, matrix=48, voxel_size=3.0, seed=2)


def test_the_rerun_is_the_same_chain(dataset):
    """No change in, the same χ out, bit for bit (the rerun takes the first run's brain
    mask, which the unchanged magnitude would give again); a change comes back inside the
    band it was put in."""
    ses = ingest.find_sessions(dataset / "sub-01")[0]
    series = ingest.load_megre(ses.series[0], subject=ses.subject, session=ses.session)
    first = process_series(series)
    respond = chain_response(series, process_series, brain_mask=first.brain_mask.data > 0)
    chi = np.where(first.qsm_mask.data > 0, first.chi.data, np.nan)
    assert np.array_equal(respond(np.zeros(series.shape, np.float32)), chi, equal_nan=True)
    blob = np.zeros(series.shape, np.float32)
    blob[20:28, 20:28, 20:28] = 0.05
    change = respond(blob) - chi
    inside = np.nanmean(change[21:27, 21:27, 21:27])
    assert 0.6 * 0.05 < inside < 1.2 * 0.05, inside


def test_qsm_records_the_transfer_and_can_skip_it(dataset, tmp_path):
    out = tmp_path / "with"
    run = CliRunner().invoke(cli, ["qsm", str(dataset / "sub-01"), "--out", str(out),
                                   "--no-registry"])
    assert run.exit_code == 0, run.output
    doc = json.loads(next(out.rglob("*_desc-motorcortex_indices.json")).read_text())
    fit = doc["Parameters"]["PartialVolumeFits"]["chi"]["ChainTransfer"]
    assert 0.2 <= fit["Transfer"] <= 1.2 and fit["Perturbation_ppm"] == 0.01
    table = next(out.rglob("*_desc-motorcortex_indices.tsv")).read_text()
    assert TRANSFER_CORRECTED_INDEX in table
    skip = tmp_path / "without"
    run = CliRunner().invoke(cli, ["qsm", str(dataset / "sub-01"), "--out", str(skip),
                                   "--no-registry", "--no-chain-transfer"])
    assert run.exit_code == 0, run.output
    doc = json.loads(next(skip.rglob("*_desc-motorcortex_indices.json")).read_text())
    assert "ChainTransfer" not in doc["Parameters"]["PartialVolumeFits"]["chi"]
    assert TRANSFER_CORRECTED_INDEX not in next(
        skip.rglob("*_desc-motorcortex_indices.tsv")).read_text()
