//! Reads the agent's OpenMetrics text into samples a test can sum by label.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            samples.push(parse_line(line).with_context(|| format!("bad sample line: {line}"))?);
        }
        Ok(Self { samples, text: text.to_owned() })
    }

    /// Sum of the samples named `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // `+ 0.0` turns the empty sum's -0.0 into 0.
        self.matching(name, labels).map(|s| s.value).sum::<f64>() + 0.0
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Values of label `key` among samples named `name`.
    pub fn label_values(&self, name: &str, key: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(key).cloned())
            .collect();
        values.sort();
        values.dedup();
        values
    }
}

fn parse_line(line: &str) -> anyhow::Result<Sample> {
    let (name, rest) = match line.find('{') {
        Some(open) => (&line[..open], &line[open..]),
        None => line.split_once(' ').context("no value")?,
    };
    let mut labels = BTreeMap::new();
    let value_part = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end;
        loop {
            // key
            let Some(&(start, c)) = chars.peek() else { bail!("unterminated labels") };
            if c == '}' {
                end = start + 1;
                break;
            }
            if c == ',' {
                chars.next();
                continue;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                bail!("label value not quoted");
            }
            let mut value = String::new();
            let mut escaped = false;
            for (_, c) in chars.by_ref() {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false;
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    (false, c) => value.push(c),
                }
            }
            labels.insert(key, value);
        }
        &body[end..]
    } else {
        rest
    };
    let value = value_part.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("bad value {v}"))?,
    };
    Ok(Sample { name: name.to_owned(), labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes() -> anyhow::Result<()> {
        let scrape = Scrape::parse(
            "# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"{,}\"} 3\nx_total{a=\"2\"} 4\ny 1.5\nh_bucket{le=\"+Inf\"} 2\n# EOF\n",
        )?;
        assert_eq!(scrape.sum("x_total", &[]), 7.0);
        assert_eq!(scrape.sum("x_total", &[("b", "q\"{,}")]), 3.0);
        assert_eq!(scrape.sum("y", &[]), 1.5);
        assert_eq!(scrape.label_values("x_total", "a"), vec!["1", "2"]);
        Ok(())
    }
}
