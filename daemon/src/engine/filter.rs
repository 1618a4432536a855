//! Metric filter expressions: a small SQL-like language over one row.
//!
//! `status = 'active' AND (fee >= 10 OR plan IN ('gold', 'silver')) AND NOT deleted_at IS NULL`
//!
//! Operators: `=`, `!=` (or `<>`), `<`, `<=`, `>`, `>=`, `IN (…)`, `IS [NOT] NULL`, `AND`, `OR`,
//! `NOT`, parentheses. Literals: 'text' (with '' for a quote), numbers, `true`, `false`.
//! Evaluation follows SQL's three-valued logic: a comparison with NULL is unknown, and a
//! row counts only when the whole filter is true. Parsing never panics on any input.

use std::cmp::Ordering;

use pulse_cdc::Value;

use super::value;

/// A literal as written, before it is typed by the column it is compared with.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// 'text'.
    Text(String),
    /// A number, kept as written.
    Number(String),
    /// true / false.
    Bool(bool),
}

impl Literal {
    fn to_json(&self) -> serde_json::Value {
        match self {
            Literal::Text(s) => serde_json::Value::String(s.clone()),
            Literal::Number(n) => n
                .parse::<serde_json::Number>()
                .map(serde_json::Value::Number)
                .unwrap_or_else(|_| serde_json::Value::String(n.clone())),
            Literal::Bool(b) => serde_json::Value::Bool(*b),
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// =
    Eq,
    /// != or <>
    Ne,
    /// <
    Lt,
    /// <=
    Le,
    /// >
    Gt,
    /// >=
    Ge,
}

/// A parsed filter. `V` is the literal type: [`Literal`] after parsing, [`Value`] once
/// typed against the catalog.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr<V = Value> {
    /// column op literal.
    Cmp(String, Op, V),
    /// column IN (literals).
    In(String, Vec<V>),
    /// column IS NULL (negated: IS NOT NULL).
    IsNull(String, bool),
    /// Both.
    And(Box<Expr<V>>, Box<Expr<V>>),
    /// Either.
    Or(Box<Expr<V>>, Box<Expr<V>>),
    /// Not.
    Not(Box<Expr<V>>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Op(Op),
    LParen,
    RParen,
    Comma,
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1
            }
            '=' => {
                out.push(Tok::Op(Op::Eq));
                i += 1
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Tok::Op(Op::Ne));
                i += 2
            }
            '<' => match chars.get(i + 1) {
                Some('=') => {
                    out.push(Tok::Op(Op::Le));
                    i += 2
                }
                Some('>') => {
                    out.push(Tok::Op(Op::Ne));
                    i += 2
                }
                _ => {
                    out.push(Tok::Op(Op::Lt));
                    i += 1
                }
            },
            '>' => {
                if chars.get(i + 1) == Some(&'=') {
                    out.push(Tok::Op(Op::Ge));
                    i += 2
                } else {
                    out.push(Tok::Op(Op::Gt));
                    i += 1
                }
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(c) => {
                            s.push(*c);
                            i += 1
                        }
                    }
                }
                out.push(Tok::Str(s));
            }
            c if c.is_ascii_digit() || c == '-' || c == '.' => {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                let n: String = chars[start..i].iter().collect();
                if n.parse::<f64>().is_err() {
                    return Err(format!("{n:?} is not a number"));
                }
                out.push(Tok::Num(n));
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected character {other:?}")),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn keyword(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case(word)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn or(&mut self) -> Result<Expr<Literal>, String> {
        let mut left = self.and()?;
        while self.keyword("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Expr<Literal>, String> {
        let mut left = self.not()?;
        while self.keyword("AND") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }
    fn not(&mut self) -> Result<Expr<Literal>, String> {
        self.depth += 1;
        if self.depth > 64 {
            return Err("the expression nests too deeply".into());
        }
        let e = if self.keyword("NOT") {
            Expr::Not(Box::new(self.not()?))
        } else {
            self.primary()?
        };
        self.depth -= 1;
        Ok(e)
    }
    fn literal(&mut self) -> Result<Literal, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Literal::Text(s)),
            Some(Tok::Num(n)) => Ok(Literal::Number(n)),
            Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("true") => Ok(Literal::Bool(true)),
            Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("false") => Ok(Literal::Bool(false)),
            Some(t) => Err(format!("expected a literal, found {t:?}")),
            None => Err("expected a literal, found the end".into()),
        }
    }
    fn primary(&mut self) -> Result<Expr<Literal>, String> {
        match self.next() {
            Some(Tok::LParen) => {
                let e = self.or()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    _ => Err("expected )".into()),
                }
            }
            Some(Tok::Ident(col)) => {
                if self.keyword("IS") {
                    let negated = self.keyword("NOT");
                    if !self.keyword("NULL") {
                        return Err(format!("expected NULL after {col} IS"));
                    }
                    return Ok(Expr::IsNull(col, negated));
                }
                if self.keyword("IN") {
                    if self.next() != Some(Tok::LParen) {
                        return Err(format!("expected ( after {col} IN"));
                    }
                    let mut items = vec![self.literal()?];
                    loop {
                        match self.next() {
                            Some(Tok::Comma) => items.push(self.literal()?),
                            Some(Tok::RParen) => break,
                            _ => return Err("expected , or ) in the IN list".into()),
                        }
                    }
                    return Ok(Expr::In(col, items));
                }
                match self.next() {
                    Some(Tok::Op(op)) => Ok(Expr::Cmp(col, op, self.literal()?)),
                    _ => Err(format!("expected an operator after {col}")),
                }
            }
            Some(t) => Err(format!("expected a column or (, found {t:?}")),
            None => Err("unexpected end of the expression".into()),
        }
    }
}

/// Parses a filter expression.
pub fn parse(src: &str) -> Result<Expr<Literal>, String> {
    let mut p = Parser {
        toks: lex(src)?,
        pos: 0,
        depth: 0,
    };
    let e = p.or()?;
    if p.pos < p.toks.len() {
        return Err(format!("unexpected {:?} after the expression", p.toks[p.pos]));
    }
    Ok(e)
}

impl Expr<Literal> {
    /// Types every literal by its column's catalog type (`type_of` answers `None` for an
    /// unknown column), so evaluation compares like with like.
    pub fn bind(&self, type_of: &dyn Fn(&str) -> Option<String>) -> Result<Expr<Value>, String> {
        let ty = |col: &str| type_of(col).ok_or_else(|| format!("no column {col:?}"));
        let typed = |col: &str, lit: &Literal| -> Result<Value, String> {
            let t = ty(col)?;
            value::from_json(&t, &lit.to_json())
                .ok_or_else(|| format!("{lit:?} is not a valid {t} for column {col:?}"))
        };
        Ok(match self {
            Expr::Cmp(c, op, l) => Expr::Cmp(c.clone(), *op, typed(c, l)?),
            Expr::In(c, ls) => Expr::In(
                c.clone(),
                ls.iter().map(|l| typed(c, l)).collect::<Result<_, _>>()?,
            ),
            Expr::IsNull(c, n) => {
                ty(c)?;
                Expr::IsNull(c.clone(), *n)
            }
            Expr::And(a, b) => Expr::And(Box::new(a.bind(type_of)?), Box::new(b.bind(type_of)?)),
            Expr::Or(a, b) => Expr::Or(Box::new(a.bind(type_of)?), Box::new(b.bind(type_of)?)),
            Expr::Not(a) => Expr::Not(Box::new(a.bind(type_of)?)),
        })
    }
}

impl<V> Expr<V> {
    /// Every column the expression reads.
    pub fn columns(&self, out: &mut Vec<String>) {
        match self {
            Expr::Cmp(c, _, _) | Expr::In(c, _) | Expr::IsNull(c, _) => out.push(c.clone()),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.columns(out);
                b.columns(out);
            }
            Expr::Not(a) => a.columns(out),
        }
    }
}

impl Expr<Value> {
    /// Three-valued evaluation over a row given by `get` (column name to value).
    pub fn eval<'a>(&self, get: &dyn Fn(&str) -> Option<&'a Value>) -> Option<bool> {
        let null = Value::Null;
        match self {
            Expr::Cmp(c, op, lit) => {
                let v = get(c).unwrap_or(&null);
                let ord = value::compare(v, lit)?;
                Some(match op {
                    Op::Eq => ord == Ordering::Equal,
                    Op::Ne => ord != Ordering::Equal,
                    Op::Lt => ord == Ordering::Less,
                    Op::Le => ord != Ordering::Greater,
                    Op::Gt => ord == Ordering::Greater,
                    Op::Ge => ord != Ordering::Less,
                })
            }
            Expr::In(c, lits) => {
                let v = get(c).unwrap_or(&null);
                if matches!(v, Value::Null) {
                    return None;
                }
                Some(lits.iter().any(|l| value::compare(v, l) == Some(Ordering::Equal)))
            }
            Expr::IsNull(c, negated) => {
                let is_null = matches!(get(c), None | Some(Value::Null));
                Some(is_null != *negated)
            }
            Expr::And(a, b) => match (a.eval(get), b.eval(get)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Expr::Or(a, b) => match (a.eval(get), b.eval(get)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Expr::Not(a) => a.eval(get).map(|b| !b),
        }
    }

    /// Whether the row passes (unknown counts as no, as in a SQL WHERE).
    pub fn matches<'a>(&self, get: &dyn Fn(&str) -> Option<&'a Value>) -> bool {
        self.eval(get) == Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(c: &str) -> Option<String> {
        match c {
            "status" => Some("text".into()),
            "fee" => Some("numeric".into()),
            "n" => Some("int4".into()),
            "deleted_at" => Some("timestamptz".into()),
            _ => None,
        }
    }

    fn row<'a>(pairs: &'a [(&'a str, Value)]) -> impl Fn(&str) -> Option<&'a Value> {
        move |c| pairs.iter().find(|(k, _)| *k == c).map(|(_, v)| v)
    }

    #[test]
    fn every_operator_evaluates() {
        let e = parse("status = 'active' AND (fee >= 10 OR n IN (1, 2)) AND NOT deleted_at IS NOT NULL")
            .unwrap()
            .bind(&types)
            .unwrap();
        let r = [
            ("status", Value::Text("active".into())),
            ("fee", Value::Numeric("12.5".into())),
            ("n", Value::Int(7)),
            ("deleted_at", Value::Null),
        ];
        assert!(e.matches(&row(&r)));
        let r2 = [
            ("status", Value::Text("active".into())),
            ("fee", Value::Numeric("1".into())),
            ("n", Value::Int(2)),
            ("deleted_at", Value::Null),
        ];
        assert!(e.matches(&row(&r2)));
        let r3 = [
            ("status", Value::Text("gone".into())),
            ("fee", Value::Null),
            ("n", Value::Int(2)),
            ("deleted_at", Value::Null),
        ];
        assert!(!e.matches(&row(&r3)));
        for (src, expect) in [
            ("n != 7", false),
            ("n <> 8", true),
            ("n < 8", true),
            ("n <= 7", true),
            ("n > 7", false),
            ("fee = 1", false),
        ] {
            let e = parse(src).unwrap().bind(&types).unwrap();
            let r = [("n", Value::Int(7)), ("fee", Value::Null)];
            assert_eq!(e.matches(&row(&r)), expect, "{src}");
        }
        // NULL comparisons are unknown, and NOT unknown is still unknown.
        let e = parse("NOT fee = 1").unwrap().bind(&types).unwrap();
        assert!(!e.matches(&row(&[("fee", Value::Null)])));
    }

    #[test]
    fn bad_expressions_are_refused_with_a_reason() {
        for bad in [
            "",
            "status =",
            "status = 'x",
            "(n = 1",
            "n = 1 n",
            "n IN ()",
            "n ~ 1",
            "n = 'abc'",
        ] {
            let r = parse(bad).and_then(|e| e.bind(&types));
            assert!(r.is_err(), "{bad:?} was accepted");
        }
        assert!(
            parse("nope = 1")
                .unwrap()
                .bind(&types)
                .unwrap_err()
                .contains("nope")
        );
        // Deep nesting is refused, not a stack overflow.
        let deep = "NOT ".repeat(10_000) + "n = 1";
        assert!(parse(&deep).is_err());
        let parens = "(".repeat(10_000);
        assert!(parse(&parens).is_err());
    }
}
