"""The evidence: ``norton compare`` (NORTON side by side with other methods),
``norton report`` (the paper's analyses), the demo and the showcase."""
from norton.evidence.compare import CompareBudget, run_compare
from norton.evidence.demo import DemoBudget, run_demo
from norton.evidence.report import ReportPlan, run_report
from norton.evidence.showcase import run_showcase

__all__ = ["CompareBudget", "DemoBudget", "ReportPlan", "run_compare", "run_demo", "run_report", "run_showcase"]
