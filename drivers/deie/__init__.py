"""The grid operator's DEIE telecontrol box over IEC 60870-5-104 (docs/deie.md)."""
