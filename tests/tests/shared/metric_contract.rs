//! The metric contract: every series the agent exposes, with its labels and their closed
//! value sets, read from the agent's metric table (`connscope::model::metric_table`), and a
//! PromQL checker that holds the dashboards' and the rules' queries to it. Every series also
//! has job and instance.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};

use connscope::model::metric_table::{self as table, Kind, Metric};

/// Every `reason` of `connscope_events_lost_total` (the agent exports each from the start).
pub const EVENTS_LOST_REASONS: &[&str] = match table::LOST_REASON.values {
    Some(values) => values,
    None => &[],
};

/// Series a query may select, with the labels each one has and, for closed label sets, the
/// values each can take. `None`: any label (recording rules, whose labels are whatever their
/// expression keeps).
pub struct Contract {
    series: HashMap<String, Option<Labels>>,
}

/// A series' labels, each with its closed value set (`None`: open values).
type Labels = HashMap<String, Option<&'static [&'static str]>>;

/// The series names of one table row: a histogram has three.
fn series_of(row: &Metric) -> Vec<(String, Labels)> {
    let labels: Labels = row.all_labels().map(|l| (l.name.to_string(), l.values)).collect();
    match row.kind {
        Kind::Counter | Kind::Gauge => vec![(row.sample(), labels)],
        Kind::Histogram => {
            let mut buckets = labels.clone();
            buckets.insert("le".to_string(), None);
            vec![
                (format!("{}_sum", row.family()), labels.clone()),
                (format!("{}_count", row.family()), labels),
                (format!("{}_bucket", row.family()), buckets),
            ]
        }
    }
}

impl Contract {
    /// The contract's series plus the recording rules named in `recorded`.
    pub fn new(recorded: &[String]) -> Self {
        let mut series = HashMap::new();
        let target_labels = ["job", "instance"].map(|l| (l.to_string(), None));
        for row in table::ALL {
            for (name, mut labels) in series_of(row) {
                labels.extend(target_labels.clone());
                series.insert(name, Some(labels));
            }
        }
        // Series Prometheus itself writes for every target.
        for name in ["up", "scrape_samples_scraped"] {
            series.insert(name.to_string(), Some(target_labels.clone().into_iter().collect()));
        }
        for r in recorded {
            series.insert(r.clone(), None);
        }
        Self { series }
    }

    /// True when `metric` is a contract series with label `label`.
    pub fn has_label(&self, metric: &str, label: &str) -> bool {
        self.series.get(metric).and_then(|l| l.as_ref()).is_some_and(|l| l.contains_key(label))
    }

    /// Problems with one selector: unknown metric, unknown label, impossible label value.
    fn check_selector(&self, vs: &VectorSelector, problems: &mut Vec<String>) {
        let matchers: Vec<&Matcher> =
            vs.matchers.matchers.iter().chain(vs.matchers.or_matchers.iter().flatten()).collect();
        let name = vs.name.clone().or_else(|| {
            matchers
                .iter()
                .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
                .map(|m| m.value.clone())
        });
        let Some(name) = name else {
            problems.push(format!("selector `{vs}` names no metric"));
            return;
        };
        let Some(labels) = self.series.get(&name) else {
            problems.push(format!(
                "metric `{name}` is not in the metric contract nor a recording rule"
            ));
            return;
        };
        let Some(labels) = labels else { return };
        for m in matchers.iter().filter(|m| m.name != "__name__") {
            let Some(values) = labels.get(&m.name) else {
                problems.push(format!("`{name}` has no label `{}` (matcher in `{vs}`)", m.name));
                continue;
            };
            let Some(allowed) = values else { continue };
            // Plain values and alternations of plain values must all be possible values.
            let plain = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let wanted: Vec<&str> = match &m.op {
                MatchOp::Equal | MatchOp::NotEqual => vec![m.value.as_str()],
                MatchOp::Re(_) | MatchOp::NotRe(_) if m.value.split('|').all(plain) => {
                    m.value.split('|').collect()
                }
                _ => vec![],
            };
            for w in wanted {
                if !allowed.contains(&w) {
                    problems.push(format!("`{name}` label `{}` never has the value `{w}`", m.name));
                }
            }
        }
    }
}

/// Walks a parsed expression: checks every selector against the contract and, when
/// `rate_range` is set, that rate()/increase()/irate() read exactly that range.
struct QueryCheck<'a> {
    contract: &'a Contract,
    rate_range: Option<Duration>,
    problems: Vec<String>,
}

impl ExprVisitor for QueryCheck<'_> {
    type Error = Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Infallible> {
        match expr {
            Expr::VectorSelector(vs) => self.contract.check_selector(vs, &mut self.problems),
            Expr::MatrixSelector(ms) => self.contract.check_selector(&ms.vs, &mut self.problems),
            Expr::Call(call) if matches!(call.func.name, "rate" | "increase" | "irate") => {
                if let Some(want) = self.rate_range {
                    for arg in &call.args.args {
                        match arg.as_ref() {
                            Expr::MatrixSelector(ms) if ms.range == want => {}
                            other => self.problems.push(format!(
                                "{}() must read [$__rate_interval], not `{other}`",
                                call.func.name
                            )),
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(true)
    }
}

/// Parses a PromQL expression and returns the contract problems found in it.
pub fn check_promql(expr: &str, contract: &Contract, rate_range: Option<Duration>) -> Vec<String> {
    let parsed = match promql_parser::parser::parse(expr) {
        Ok(e) => e,
        Err(e) => return vec![format!("does not parse: {e}")],
    };
    let mut v = QueryCheck { contract, rate_range, problems: vec![] };
    // The visitor's error type is Infallible.
    let _ = walk_expr(&mut v, &parsed);
    v.problems
}
