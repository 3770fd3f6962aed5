"""Reports on finished or running runs: `cpt report` for one run, `cpt compare` for several.

Importing this package is cheap (argparse only); reading runs and plotting load on first use.
"""

from cpt.report.command import add_report_parsers, cmd_compare, cmd_report, write_report

__all__ = ["add_report_parsers", "cmd_compare", "cmd_report", "write_report"]
