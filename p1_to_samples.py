"""Convert DSMR P1 smart-meter data into upload samples for the energy monitor.

Input is a file of raw P1 telegrams or a series CSV with one row per telegram,
whose ``obis <code>`` columns contain the raw values with their units
(``00.378*kW``). Each telegram becomes one sample::

    {"device_id": "meter-1", "ts": "2019-03-24T15:05:19+01:00",
     "power_w": 378, "import_power_w": 378,
     "energy_import_kwh": 6657.459, "energy_export_kwh": 0.0}

A telegram that cannot become a sample raises ``TelegramSkipped`` with the
reason: it has no timestamp (DSMR 2.2), no electricity power (district heat),
or it is incomplete. A malformed value raises ``ValueError``. The functions that
convert whole files log both kinds of skip at WARNING level and continue, as
an edge device skips a telegram damaged by line noise. The CRC after the end
line ``!`` is not checked.

Command line, one JSON document ``{"samples": [...]}`` per batch and line::

    python p1_to_samples.py FILE --device-id ID [--batch-size N]
"""

import argparse
import csv
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

logger = logging.getLogger(__name__)

TIMESTAMP = "0-0:1.0.0"
POWER_IMPORT = "1-0:1.7.0"
POWER_EXPORT = "1-0:2.7.0"
# DSMR defines tariffs 1 and 2. Hungarian meters add tariffs 3 and 4.
IMPORT_TARIFFS = ("1-0:1.8.1", "1-0:1.8.2", "1-0:1.8.3", "1-0:1.8.4")
EXPORT_TARIFFS = ("1-0:2.8.1", "1-0:2.8.2", "1-0:2.8.3", "1-0:2.8.4")
IMPORT_TOTAL = "1-0:1.8.0"
EXPORT_TOTAL = "1-0:2.8.0"

# NOTE: S and W are read as Central European summer and winter time, the zone of
# Dutch, Belgian, Austrian and Hungarian meters. A meter elsewhere (an Irish Iskra
# sends S in February) gets a wrong offset.
UTC_OFFSETS = {"S": timezone(timedelta(hours=2)), "W": timezone(timedelta(hours=1))}
WATTS_PER_UNIT = {"kW": Decimal(1000), "W": Decimal(1)}
KWH_PER_UNIT = {"kWh": Decimal(1), "Wh": Decimal("0.001")}

TIMESTAMP_PATTERN = re.compile(r"(\d{12})([SW])")
QUANTITY_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\*([A-Za-z]+)")
# EasyMeter appends OBIS value group F, as in 1-0:1.7.0*255, and the pattern
# drops it. Only the first bracketed value counts because the registers used
# here have one.
DATA_LINE_PATTERN = re.compile(r"(\d+-\d+:\d+\.\d+\.\d+)(?:\*\d+)?\(([^)]*)\)")


class TelegramSkipped(Exception):
    """Telegram that cannot become a sample. The message is the reason."""


def parse_timestamp(value: str) -> datetime:
    """Parse a P1 timestamp ``YYMMDDhhmmssX`` into an aware datetime.

    X is ``S`` (summer time, UTC+02:00) or ``W`` (winter time, UTC+01:00).
    Raises ValueError for any other format and for impossible dates.
    """
    match = TIMESTAMP_PATTERN.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"invalid P1 timestamp {value!r}: expected YYMMDDhhmmss followed by S or W")
    digits, season = match.groups()
    year, month, day, hour, minute, second = (int(digits[i : i + 2]) for i in range(0, 12, 2))
    try:
        return datetime(2000 + year, month, day, hour, minute, second, tzinfo=UTC_OFFSETS[season])
    except ValueError as error:
        raise ValueError(f"invalid P1 timestamp {value!r}: {error}") from error


def _scaled_value(values: dict[str, str], code: str, factors: dict[str, Decimal]) -> Decimal | None:
    """Return the register value scaled by the factor for its unit, or None if absent."""
    raw = values.get(code)
    if raw is None:
        return None
    match = QUANTITY_PATTERN.fullmatch(raw.strip())
    if match is None:
        raise ValueError(f"invalid value {raw!r} for {code}: expected a number, '*' and a unit")
    number, unit = match.groups()
    if unit not in factors:
        expected = " or ".join(factors)
        raise ValueError(f"unsupported unit {unit!r} in {code}({raw}): expected {expected}")
    return Decimal(number) * factors[unit]


def _whole_watts(watts: Decimal) -> int:
    # Meters with a W unit can send fractions such as 002124.86*W.
    return int(watts.to_integral_value(rounding=ROUND_HALF_UP))


def _energy_kwh(values: dict[str, str], tariffs: tuple[str, ...], total: str) -> float | None:
    """Return the sum of the tariff registers in kWh, else the total, else None.

    The sum is exact in Decimal and converted to float once, so 3382.147 + 3245.819
    gives 6627.966.
    """
    readings = [_scaled_value(values, code, KWH_PER_UNIT) for code in tariffs]
    present = [reading for reading in readings if reading is not None]
    energy = sum(present) if present else _scaled_value(values, total, KWH_PER_UNIT)
    return None if energy is None else float(energy)


def sample_from_obis(values: dict[str, str], device_id: str) -> dict:
    """Build a sample from raw register values keyed by OBIS code (``1-0:1.7.0``).

    Raises TelegramSkipped when the timestamp or the import power 1-0:1.7.0 is
    missing. A missing export power 1-0:2.7.0 counts as 0 W, and missing energy
    registers give null.
    """
    timestamp = values.get(TIMESTAMP)
    if not timestamp:
        raise TelegramSkipped(f"missing timestamp {TIMESTAMP}")
    import_watts = _scaled_value(values, POWER_IMPORT, WATTS_PER_UNIT)
    if import_watts is None:
        raise TelegramSkipped(f"missing electricity power {POWER_IMPORT}")
    export_watts = _scaled_value(values, POWER_EXPORT, WATTS_PER_UNIT)
    if export_watts is None:
        export_watts = Decimal(0)

    return {
        "device_id": device_id,
        "ts": parse_timestamp(timestamp).isoformat(),
        "power_w": _whole_watts(import_watts - export_watts),
        "import_power_w": _whole_watts(import_watts),
        "energy_import_kwh": _energy_kwh(values, IMPORT_TARIFFS, IMPORT_TOTAL),
        "energy_export_kwh": _energy_kwh(values, EXPORT_TARIFFS, EXPORT_TOTAL),
    }


def parse_telegram(text: str) -> dict[str, str]:
    """Return the first value of each data line of one telegram, keyed by OBIS code.

    Raises TelegramSkipped when the header line ``/`` or the end line ``!`` is
    missing, and ValueError when the text contains more than one telegram.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("/"):
        raise TelegramSkipped("incomplete telegram: no header line starting with '/'")
    end = next((index for index, line in enumerate(lines) if line.startswith("!")), None)
    if end is None:
        raise TelegramSkipped("incomplete telegram: no end line starting with '!'")
    headers = sum(1 for line in lines[:end] if line.startswith("/"))
    if headers > 1:
        raise ValueError(f"text contains {headers} telegram headers: split it with split_telegrams()")

    values = {}
    for line in lines[1:end]:
        match = DATA_LINE_PATTERN.match(line)
        if match is not None:
            values[match.group(1)] = match.group(2)
    return values


def sample_from_telegram(text: str, device_id: str) -> dict:
    """Build a sample from the text of one raw telegram.

    Raises TelegramSkipped for an incomplete telegram or one without timestamp
    or electricity power.
    """
    return sample_from_obis(parse_telegram(text), device_id)


def split_telegrams(text: str) -> list[str]:
    """Split text into pieces that run from a header line ``/`` to an end line ``!``.

    Text that does not fit, such as the start of a capture or a telegram cut off
    by the next header, becomes a piece of its own so that parsing it reports why
    it is skipped.
    """
    pieces: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("/") and current:
            pieces.append(current)
            current = []
        current.append(line)
        if line.startswith("!"):
            pieces.append(current)
            current = []
    pieces.append(current)
    return ["\n".join(piece) for piece in pieces if any(line.strip() for line in piece)]


def samples_from_telegram_file(path: str | Path, device_id: str) -> list[dict]:
    """Convert every complete telegram in a file and log the ones skipped."""
    # Latin-1 decodes any byte. Some meters fill the text message 0-0:96.13.0 with
    # 0xFF bytes, which are invalid UTF-8.
    text = Path(path).read_text(encoding="latin-1")
    samples = []
    for number, telegram in enumerate(split_telegrams(text), start=1):
        # A raw capture contains telegrams damaged by line noise: skip them as the edge device does.
        try:
            samples.append(sample_from_telegram(telegram, device_id))
        except (TelegramSkipped, ValueError) as skip:
            logger.warning("skipped telegram %d in %s: %s", number, path, skip)
    return samples


def samples_from_series_csv(path: str | Path, device_id: str) -> list[dict]:
    """Convert every row of a series CSV and log the rows skipped.

    Only the ``obis <code>`` columns are read, and blank cells count as missing
    registers. The CRC columns are ignored.
    """
    samples = []
    with open(path, newline="", encoding="utf-8") as file:
        for row_number, row in enumerate(csv.DictReader(file), start=1):
            values = {
                column.removeprefix("obis "): value
                for column, value in row.items()
                if column.startswith("obis ") and value
            }
            try:
                samples.append(sample_from_obis(values, device_id))
            except (TelegramSkipped, ValueError) as skip:
                logger.warning("skipped row %d in %s: %s", row_number, path, skip)
    return samples


def is_series_csv(path: str | Path) -> bool:
    """Return whether the file is a series CSV, by suffix or by its column header."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return True
    with open(path, encoding="latin-1") as file:
        first_line = file.readline()
    return "obis " in first_line and "," in first_line


def batches(samples: list[dict], size: int) -> Iterator[list[dict]]:
    """Yield consecutive slices of at most ``size`` samples."""
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _batch_size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid batch size {text!r}: expected a whole number of 1 or more")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """Run the command line converter and return the exit status."""
    parser = argparse.ArgumentParser(
        description="Convert a P1 telegram file or series CSV into upload samples, "
        'one JSON document {"samples": [...]} per batch and line.'
    )
    parser.add_argument("file", type=Path, help="telegram file, or series CSV with obis <code> columns")
    parser.add_argument("--device-id", required=True, help="device_id written into every sample")
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=100,
        help="maximum samples per JSON document (default: 100)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)

    try:
        if is_series_csv(args.file):
            samples = samples_from_series_csv(args.file, args.device_id)
        else:
            samples = samples_from_telegram_file(args.file, args.device_id)
    except OSError as error:
        logger.error("failed to read %s: %s", args.file, error)
        return 1
    except ValueError as error:
        logger.error("conversion failed: %s", error)
        return 1

    try:
        for batch in batches(samples, args.batch_size):
            print(json.dumps({"samples": batch}))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader closed the pipe early, as `head` does. Pointing stdout at
        # /dev/null stops Python from raising again when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    logger.info("samples written: %d from %s", len(samples), args.file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
