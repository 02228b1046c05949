"""Unit tests for the P1 telegram converter, on real telegrams in tests/data."""

import json
import logging
import sys
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from pathlib import Path

import pytest

# The converter is a script in the repository root, and pytest puts only tests/
# on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p1_to_samples import (
    TelegramSkipped,
    main,
    parse_telegram,
    parse_timestamp,
    sample_from_obis,
    sample_from_telegram,
    samples_from_series_csv,
    samples_from_telegram_file,
    split_telegrams,
)

DATA = Path(__file__).resolve().parent / "data"
ISKRA_SERIES = DATA / "nielsbasjes-iskra-am550-dsmr5-1s.csv"
HUNGARIAN_SERIES = DATA / "gaborvar-hu-20230502-10s.csv"


def read_telegram(name: str) -> str:
    # Latin-1 decodes the 0xFF bytes in 032, which are invalid UTF-8.
    return (DATA / name).read_text(encoding="latin-1")


def obis_values(**overrides: str) -> dict[str, str]:
    """Return the registers of the first Iskra AM550 series row, updated by overrides."""
    values = {
        "0-0:1.0.0": "190324150519W",
        "1-0:1.7.0": "00.378*kW",
        "1-0:2.7.0": "00.000*kW",
        "1-0:1.8.1": "003432.827*kWh",
        "1-0:1.8.2": "003224.632*kWh",
        "1-0:2.8.1": "000000.000*kWh",
        "1-0:2.8.2": "000000.000*kWh",
    }
    values.update(overrides)
    return values


def without(values: dict[str, str], *codes: str) -> dict[str, str]:
    return {code: value for code, value in values.items() if code not in codes}


# Timestamps


def test_timestamp_summer_offset():
    parsed = parse_timestamp("230502215000S")

    assert parsed == datetime(2023, 5, 2, 21, 50, 0, tzinfo=timezone(timedelta(hours=2)))
    assert parsed.isoformat() == "2023-05-02T21:50:00+02:00"


def test_timestamp_winter_offset():
    parsed = parse_timestamp("190324150519W")

    assert parsed == datetime(2019, 3, 24, 15, 5, 19, tzinfo=timezone(timedelta(hours=1)))
    assert parsed.isoformat() == "2019-03-24T15:05:19+01:00"


def test_timestamp_same_instant_across_flags():
    # 03:00 summer time and 02:00 winter time are both 01:00 UTC.
    assert parse_timestamp("231029030000S") == parse_timestamp("231029020000W")


@pytest.mark.parametrize(
    "value", ["190324150519", "190324150519X", "1903241505W", "191324150519W", "190230120000S", ""]
)
def test_timestamp_invalid_raises(value):
    with pytest.raises(ValueError, match="invalid P1 timestamp"):
        parse_timestamp(value)


# Registers and units


def test_sample_fields_and_values():
    sample = sample_from_obis(obis_values(), "meter-1")

    assert sample == {
        "device_id": "meter-1",
        "ts": "2019-03-24T15:05:19+01:00",
        "power_w": 378,
        "import_power_w": 378,
        "energy_import_kwh": 6657.459,
        "energy_export_kwh": 0.0,
    }


def test_power_kw_exact_watts():
    sample = sample_from_obis(obis_values(**{"1-0:1.7.0": "00.378*kW"}), "meter-1")

    assert sample["import_power_w"] == 378
    assert type(sample["import_power_w"]) is int


def test_power_w_unit():
    sample = sample_from_telegram(read_telegram("007-dsmr_parser-sagemcom-t210dr-at.txt"), "meter-1")

    assert sample["import_power_w"] == 286
    assert sample["power_w"] == 286


def test_energy_wh_unit():
    sample = sample_from_telegram(read_telegram("007-dsmr_parser-sagemcom-t210dr-at.txt"), "meter-1")

    assert sample["energy_import_kwh"] == 6545.766
    assert sample["energy_export_kwh"] == 0.058


def test_power_fractional_watts_rounded():
    sample = sample_from_obis(
        obis_values(**{"1-0:1.7.0": "002124.86*W", "1-0:2.7.0": "000000.50*W"}),
        "meter-1",
    )

    assert sample["import_power_w"] == 2125
    assert sample["power_w"] == 2124


def test_power_export_negative():
    sample = sample_from_telegram(read_telegram("009-dsmr_parser-sagemcom-eon-hu.txt"), "meter-1")

    assert sample["power_w"] == -2601
    assert sample["import_power_w"] == 0


def test_power_import_and_export_net():
    sample = sample_from_telegram(read_telegram("008-dsmr_parser-iskra-ireland.txt"), "meter-1")

    assert sample["power_w"] == 170 - 270
    assert sample["import_power_w"] == 170


def test_power_export_missing_counts_zero():
    sample = sample_from_obis(without(obis_values(), "1-0:2.7.0"), "meter-1")

    assert sample["power_w"] == 378


def test_power_unsupported_unit_raises():
    with pytest.raises(ValueError, match="kvar"):
        sample_from_obis(obis_values(**{"1-0:1.7.0": "00.378*kvar"}), "meter-1")


def test_power_value_without_unit_raises():
    with pytest.raises(ValueError, match="1-0:1.7.0"):
        sample_from_obis(obis_values(**{"1-0:1.7.0": "00.378"}), "meter-1")


# Energy registers


def test_tariff_sum_exact_decimals():
    values = obis_values(**{"1-0:1.8.1": "003382.147*kWh", "1-0:1.8.2": "003245.819*kWh"})

    energy = sample_from_obis(values, "meter-1")["energy_import_kwh"]

    assert energy == 6627.966
    assert repr(energy) == "6627.966"


def test_tariff_sum_kaifa_telegram():
    sample = sample_from_telegram(read_telegram("002-dsmr_parser-v4_2-kaifa.txt"), "meter-1")

    assert sample["energy_import_kwh"] == 3016.829
    assert sample["energy_export_kwh"] == 0.0


def test_tariff_sum_four_tariffs():
    values = obis_values(
        **{
            "1-0:1.8.1": "000001.000*kWh",
            "1-0:1.8.2": "000002.000*kWh",
            "1-0:1.8.3": "000004.000*kWh",
            "1-0:1.8.4": "000008.000*kWh",
            "1-0:1.8.0": "000015.000*kWh",
        }
    )

    assert sample_from_obis(values, "meter-1")["energy_import_kwh"] == 15.0


def test_tariff_sum_hungarian_telegram():
    sample = sample_from_telegram(read_telegram("032-gaborvar-hu-ff-bytes.txt"), "meter-1")

    assert sample["energy_import_kwh"] == 8234.524
    assert sample["energy_export_kwh"] == 376.54


def test_tariff_sum_preferred_over_totals():
    values = obis_values(**{"1-0:1.8.0": "009999.999*kWh", "1-0:2.8.0": "009999.999*kWh"})

    sample = sample_from_obis(values, "meter-1")

    assert sample["energy_import_kwh"] == 6657.459
    assert sample["energy_export_kwh"] == 0.0


def test_totals_fallback():
    values = without(obis_values(), "1-0:1.8.1", "1-0:1.8.2", "1-0:2.8.1", "1-0:2.8.2")
    values["1-0:1.8.0"] = "00052185.7825309*kWh"
    values["1-0:2.8.0"] = "00019949.3221493*kWh"

    sample = sample_from_obis(values, "meter-1")

    assert sample["energy_import_kwh"] == 52185.7825309
    assert sample["energy_export_kwh"] == 19949.3221493


def test_energy_missing_is_none():
    values = without(obis_values(), "1-0:1.8.1", "1-0:1.8.2", "1-0:2.8.1", "1-0:2.8.2")

    sample = sample_from_obis(values, "meter-1")

    assert sample["energy_import_kwh"] is None
    assert sample["energy_export_kwh"] is None


# Skipped telegrams


@pytest.mark.parametrize("name", ["001-dsmr_parser-v2_2-iskra.txt", "020-dsmr-tools-iskra-mt382-dsmr22.txt"])
def test_dsmr22_skipped(name):
    with pytest.raises(TelegramSkipped, match="missing timestamp 0-0:1.0.0"):
        sample_from_telegram(read_telegram(name), "meter-1")


def test_heat_telegram_skipped():
    with pytest.raises(TelegramSkipped, match="missing electricity power 1-0:1.7.0"):
        sample_from_telegram(read_telegram("011-dsmr_parser-warmtelink-heat.txt"), "meter-1")


def test_obis_without_power_skipped():
    with pytest.raises(TelegramSkipped, match="1-0:1.7.0"):
        sample_from_obis(without(obis_values(), "1-0:1.7.0"), "meter-1")


def test_telegram_without_end_line_skipped():
    first = split_telegrams(read_telegram("028-dsmr-tools-am550-truncated-then-export.txt"))[0]

    with pytest.raises(TelegramSkipped, match="no end line"):
        sample_from_telegram(first, "meter-1")


def test_telegram_without_header_skipped():
    text = read_telegram("002-dsmr_parser-v4_2-kaifa.txt").split("\n", 1)[1]

    with pytest.raises(TelegramSkipped, match="no header line"):
        sample_from_telegram(text, "meter-1")


def test_telegram_text_with_two_telegrams_raises():
    with pytest.raises(ValueError, match="split_telegrams"):
        sample_from_telegram(read_telegram("028-dsmr-tools-am550-truncated-then-export.txt"), "meter-1")


# Telegram parsing


def test_telegram_lf_line_endings():
    sample = sample_from_telegram(read_telegram("030-avans-sagemcom-t211-lf-only.txt"), "meter-1")

    assert sample == {
        "device_id": "meter-1",
        "ts": "2025-01-30T21:17:29+01:00",
        "power_w": 1865,
        "import_power_w": 1865,
        "energy_import_kwh": 14341.068,
        "energy_export_kwh": 8243.476,
    }


def test_telegram_crlf_line_endings():
    text = (DATA / "002-dsmr_parser-v4_2-kaifa.txt").read_bytes().decode("ascii")
    assert "\r\n" in text

    sample = sample_from_telegram(text, "meter-1")

    assert sample["ts"] == "2016-11-13T20:57:57+01:00"
    assert sample["power_w"] == 2027


def test_telegram_obis_group_f_suffix():
    values = parse_telegram(split_telegrams(read_telegram("010-dsmr_parser-easymeter-q3d.txt"))[0])

    assert values["1-0:1.7.0"] == "002124.86*W"
    assert values["1-0:1.8.0"] == "00052185.7825309*kWh"


def test_telegram_first_value_only():
    values = parse_telegram(read_telegram("009-dsmr_parser-sagemcom-eon-hu.txt"))

    assert values["0-0:98.1.0"] == "230701000000S"


def test_split_truncated_then_complete():
    pieces = split_telegrams(read_telegram("028-dsmr-tools-am550-truncated-then-export.txt"))

    assert len(pieces) == 2
    assert pieces[0].startswith("/ISK5")
    assert pieces[1].rstrip().endswith("!34B6")


def test_file_truncated_then_export(caplog):
    path = DATA / "028-dsmr-tools-am550-truncated-then-export.txt"

    with caplog.at_level(logging.WARNING):
        samples = samples_from_telegram_file(path, "meter-1")

    assert samples == [
        {
            "device_id": "meter-1",
            "ts": "2022-05-28T15:02:45+02:00",
            "power_w": -2857,
            "import_power_w": 0,
            "energy_import_kwh": 29681.851,
            "energy_export_kwh": 8588.747,
        }
    ]
    assert "skipped telegram 1" in caplog.text
    assert "no end line" in caplog.text


def test_file_ff_bytes_message():
    samples = samples_from_telegram_file(DATA / "032-gaborvar-hu-ff-bytes.txt", "meter-1")

    assert len(samples) == 1
    assert samples[0]["ts"] == "2023-08-24T01:21:30+02:00"
    assert samples[0]["power_w"] == 2949


def test_file_heat_only_empty(caplog):
    with caplog.at_level(logging.WARNING):
        samples = samples_from_telegram_file(DATA / "011-dsmr_parser-warmtelink-heat.txt", "meter-1")

    assert samples == []
    assert "missing electricity power" in caplog.text


# Series CSV files


def test_series_iskra_row_count():
    assert len(samples_from_series_csv(ISKRA_SERIES, "meter-1")) == 566


def test_series_iskra_first_sample():
    first = samples_from_series_csv(ISKRA_SERIES, "meter-1")[0]

    assert first == {
        "device_id": "meter-1",
        "ts": "2019-03-24T15:05:19+01:00",
        "power_w": 378,
        "import_power_w": 378,
        "energy_import_kwh": 6657.459,
        "energy_export_kwh": 0.0,
    }


def test_series_iskra_last_sample():
    last = samples_from_series_csv(ISKRA_SERIES, "meter-1")[-1]

    assert last == {
        "device_id": "meter-1",
        "ts": "2019-03-24T15:14:45+01:00",
        "power_w": 744,
        "import_power_w": 744,
        "energy_import_kwh": 6657.553,
        "energy_export_kwh": 0.0,
    }


def test_series_iskra_timestamps_increase():
    stamps = [
        datetime.fromisoformat(sample["ts"]) for sample in samples_from_series_csv(ISKRA_SERIES, "meter-1")
    ]

    assert all(earlier < later for earlier, later in pairwise(stamps))


def test_series_hungarian_row_count():
    assert len(samples_from_series_csv(HUNGARIAN_SERIES, "meter-1")) == 1100


def test_series_hungarian_first_sample():
    first = samples_from_series_csv(HUNGARIAN_SERIES, "meter-1")[0]

    assert first == {
        "device_id": "meter-1",
        "ts": "2023-05-02T21:50:00+02:00",
        "power_w": 2476,
        "import_power_w": 2476,
        "energy_import_kwh": 6627.966,
        "energy_export_kwh": 0.0,
    }


def test_series_hungarian_last_sample():
    last = samples_from_series_csv(HUNGARIAN_SERIES, "meter-1")[-1]

    assert last == {
        "device_id": "meter-1",
        "ts": "2023-05-03T00:53:10+02:00",
        "power_w": 533,
        "import_power_w": 533,
        "energy_import_kwh": 6629.845,
        "energy_export_kwh": 0.0,
    }


def test_series_hungarian_failed_crc_row_kept():
    # Row idx 152 failed its CRC check, but only its header line was hit.
    row = samples_from_series_csv(HUNGARIAN_SERIES, "meter-1")[152]

    assert row["ts"] == "2023-05-02T22:15:20+02:00"
    assert row["power_w"] == 528


def test_series_blank_timestamp_skipped(tmp_path, caplog):
    path = tmp_path / "series.csv"
    path.write_text("idx,obis 0-0:1.0.0,obis 1-0:1.7.0\n0,,00.100*kW\n1,190324150520W,00.200*kW\n")

    with caplog.at_level(logging.WARNING):
        samples = samples_from_series_csv(path, "meter-1")

    assert [sample["power_w"] for sample in samples] == [200]
    assert "skipped row 1" in caplog.text


def test_series_invalid_value_skipped(tmp_path, caplog):
    path = tmp_path / "series.csv"
    path.write_text("idx,obis 0-0:1.0.0,obis 1-0:1.7.0\n0,190324150520W,fast\n1,190324150521W,00.200*kW\n")

    with caplog.at_level(logging.WARNING):
        samples = samples_from_series_csv(path, "meter-1")

    assert [sample["power_w"] for sample in samples] == [200]
    assert "skipped row 1" in caplog.text
    assert "fast" in caplog.text


# Command line


def test_cli_csv_batches(capsys):
    exit_code = main([str(ISKRA_SERIES), "--device-id", "demo-meter", "--batch-size", "200"])

    documents = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert exit_code == 0
    assert [len(document["samples"]) for document in documents] == [200, 200, 166]
    assert documents[0]["samples"][0]["device_id"] == "demo-meter"
    assert documents[-1]["samples"][-1]["ts"] == "2019-03-24T15:14:45+01:00"


def test_cli_telegram_file(capsys):
    exit_code = main(
        [
            str(DATA / "028-dsmr-tools-am550-truncated-then-export.txt"),
            "--device-id",
            "demo-meter",
        ]
    )

    lines = capsys.readouterr().out.splitlines()
    assert exit_code == 0
    assert len(lines) == 1
    assert json.loads(lines[0])["samples"][0]["power_w"] == -2857


def test_cli_csv_detected_by_header(tmp_path, capsys):
    path = tmp_path / "series.txt"
    path.write_text("idx,obis 0-0:1.0.0,obis 1-0:1.7.0\n0,190324150520W,00.200*kW\n")

    exit_code = main([str(path), "--device-id", "demo-meter"])

    assert exit_code == 0
    assert json.loads(capsys.readouterr().out)["samples"][0]["power_w"] == 200


def test_cli_missing_file_fails(tmp_path):
    assert main([str(tmp_path / "absent.csv"), "--device-id", "demo-meter"]) == 1


@pytest.mark.parametrize("size", ["0", "-1", "ten"])
def test_cli_invalid_batch_size_exits(size):
    with pytest.raises(SystemExit):
        main([str(ISKRA_SERIES), "--device-id", "demo-meter", "--batch-size", size])
