//! The figures of the benchmark against their targets (issue 14's table), printed as one table
//! and written with the raw measurements to `target/bench/report.json`.

use serde_json::{Value, json};

/// What a figure must reach.
#[derive(Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
    /// Reported without a target.
    None,
}

/// One row of the table.
pub struct Figure {
    pub name: String,
    pub value: f64,
    /// How the value is shown (with its unit or spread).
    pub shown: String,
    pub target: Target,
}

impl Figure {
    pub fn new(name: impl Into<String>, value: f64, shown: String, target: Target) -> Self {
        Self { name: name.into(), value, shown, target }
    }

    pub fn met(&self) -> Option<bool> {
        match self.target {
            Target::AtLeast(goal) => Some(self.value >= goal),
            Target::AtMost(goal) => Some(self.value <= goal),
            Target::None => None,
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::AtLeast(goal) => format!(">= {goal}"),
            Target::AtMost(goal) => format!("<= {goal}"),
            Target::None => String::new(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "figure": self.name,
            "value": self.value,
            "shown": self.shown,
            "target": self.target_text(),
            "met": self.met(),
        })
    }
}

/// The result of one part of the benchmark: its raw measurements and its figures.
pub struct Part {
    pub key: &'static str,
    pub details: Value,
    pub figures: Vec<Figure>,
}

pub fn print_table(kernel: &str, figures: &[Figure]) {
    let width = figures.iter().map(|f| f.name.len()).max().unwrap_or(10).max(6);
    let value_width = figures.iter().map(|f| f.shown.len()).max().unwrap_or(5).max(5);
    println!("\nconnscope benchmark (kernel {kernel})");
    println!("{:<width$} | {:<value_width$} | {:<9} | met", "figure", "value", "target");
    println!("{:-<width$}-|-{:-<value_width$}-|-{:-<9}-|-----", "", "", "");
    for figure in figures {
        let met = match figure.met() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        println!(
            "{:<width$} | {:<value_width$} | {:<9} | {met}",
            figure.name,
            figure.shown,
            figure.target_text()
        );
    }
}
