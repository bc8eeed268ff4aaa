//! The one text form of the IR: [`print`] writes it, [`parse`] reads it back, and
//! print -> parse -> print is byte-identical.
//!
//! ```text
//! graph "tiny" {
//!   %tokens = input "tokens" : i32[s]
//!   %embed.w = weight "model.embed_tokens.weight" : f16[256, 64]
//!   %x = embed(%embed.w, %tokens) : f32[s, 64]
//!   output "logits" = %x
//! }
//! ```
//! Lines starting with `;` are comments (filetests put their check lines there).

use std::fmt::Write;

use crate::dtype::DType;
use crate::graph::{Graph, NodeId};
use crate::op::{Attr, Op};
use crate::shape::{Dim, TensorType};

/// The printed order: computations in topological order (insertion order among ready
/// nodes), each input and weight printed just before its first use, so a reader sees a
/// weight where it is used. Sources nothing uses come last.
pub fn print_order(graph: &Graph) -> Vec<NodeId> {
    let order = graph.topo_order().unwrap_or_else(|_| graph.nodes().map(|(id, _)| id).collect());
    let mut emitted = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(order.len());
    for id in &order {
        let node = graph.node(*id);
        if node.op.is_source() {
            continue;
        }
        for input in &node.inputs {
            if graph.contains(*input) && graph.node(*input).op.is_source() && emitted.insert(*input) {
                out.push(*input);
            }
        }
        emitted.insert(*id);
        out.push(*id);
    }
    out.extend(order.into_iter().filter(|id| !emitted.contains(id)));
    out
}

/// Prints the graph in [`print_order`].
pub fn print(graph: &Graph) -> String {
    let order = print_order(graph);
    let mut out = String::new();
    writeln!(out, "graph {:?} {{", graph.name).unwrap();
    for id in order {
        let node = graph.node(id);
        write!(out, "  %{} = {}", node.name, node.op.mnemonic()).unwrap();
        if let Some(src) = node.op.source_name() {
            write!(out, " {src:?}").unwrap();
        }
        if !node.op.is_source() {
            out.push('(');
            for (i, input) in node.inputs.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let name = if graph.contains(*input) { graph.node(*input).name.as_str() } else { "<dangling>" };
                write!(out, "%{name}").unwrap();
            }
            out.push(')');
        }
        let attrs = node.op.attrs();
        if !attrs.is_empty() {
            out.push_str(" {");
            for (i, (key, value)) in attrs.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write!(out, "{key} = {value}").unwrap();
            }
            out.push('}');
        }
        writeln!(out, " : {}", node.ty).unwrap();
    }
    for (name, id) in graph.outputs() {
        writeln!(out, "  output {name:?} = %{}", graph.node(*id).name).unwrap();
    }
    out.push_str("}\n");
    out
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

struct Statement {
    line: usize,
    name: String,
    op: Op,
    operands: Vec<String>,
    ty: TensorType,
}

/// Parses the text form. Operand names are resolved after all lines are read, so the
/// result may still be ill-formed (a cycle, a type error): run the verifier on it.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut lines =
        text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty() && !l.starts_with(';'));
    let err = |line: usize, message: String| ParseError { line, message };

    let (line, header) = lines.next().ok_or_else(|| err(1, "empty input: expected `graph \"name\" {`".into()))?;
    let mut cur = Cursor::new(header);
    cur.keyword("graph").map_err(|m| err(line, m))?;
    let name = cur.string().map_err(|m| err(line, m))?;
    cur.punct('{').map_err(|m| err(line, m))?;
    cur.end().map_err(|m| err(line, m))?;

    let mut statements = Vec::new();
    let mut outputs = Vec::new();
    let mut closed = false;
    for (line, text) in lines.by_ref() {
        if text == "}" {
            closed = true;
            break;
        }
        let mut cur = Cursor::new(text);
        if cur.try_keyword("output") {
            let parsed = (|| {
                let out_name = cur.string()?;
                cur.punct('=')?;
                let value = cur.value_name()?;
                cur.end()?;
                Ok::<_, String>((out_name, value))
            })();
            outputs.push((line, parsed.map_err(|m| err(line, m))?));
            continue;
        }
        statements.push(parse_statement(&mut cur, line).map_err(|m| err(line, m))?);
    }
    if !closed {
        return Err(err(text.lines().count(), "missing closing `}`".into()));
    }
    if let Some((line, _)) = lines.next() {
        return Err(err(line, "text after the closing `}`".into()));
    }

    let mut graph = Graph::new(&name);
    let mut ids = Vec::with_capacity(statements.len());
    for st in &statements {
        let id = graph.add(&st.name, st.op.clone(), &[], st.ty.clone()).map_err(|m| err(st.line, m))?;
        ids.push(id);
    }
    for (st, id) in statements.iter().zip(&ids) {
        let mut inputs = Vec::with_capacity(st.operands.len());
        for operand in &st.operands {
            let input = graph
                .find(operand)
                .ok_or_else(|| err(st.line, format!("%{}: operand %{operand} is not defined", st.name)))?;
            inputs.push(input);
        }
        graph.set_inputs(*id, &inputs);
    }
    for (line, (out_name, value)) in outputs {
        let id =
            graph.find(&value).ok_or_else(|| err(line, format!("output {out_name:?}: %{value} is not defined")))?;
        graph.set_output(&out_name, id);
    }
    Ok(graph)
}

fn parse_statement(cur: &mut Cursor, line: usize) -> Result<Statement, String> {
    let name = cur.value_name()?;
    cur.punct('=')?;
    let mnemonic = cur.ident()?;
    let source = if cur.peek() == Some('"') { Some(cur.string()?) } else { None };
    let mut operands = Vec::new();
    if cur.eat('(') && !cur.eat(')') {
        loop {
            operands.push(cur.value_name()?);
            if cur.eat(')') {
                break;
            }
            cur.punct(',')?;
        }
    }
    let mut attrs = Vec::new();
    if cur.eat('{') {
        loop {
            let key = cur.ident()?;
            cur.punct('=')?;
            attrs.push((key, cur.attr()?));
            if cur.eat('}') {
                break;
            }
            cur.punct(',')?;
        }
    }
    cur.punct(':')?;
    let ty = cur.tensor_type()?;
    cur.end()?;
    let op = Op::from_parts(&mnemonic, source, attrs).map_err(|m| format!("%{name}: {m}"))?;
    // Sources (inputs, weights) take none: an operand written there would be dropped.
    let arity = if op.is_source() { 0 } else { op.arity() };
    if operands.len() != arity {
        return Err(format!("%{name}: `{mnemonic}` takes {arity} operands, got {}", operands.len()));
    }
    Ok(Statement { line, name, op, operands, ty })
}

struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Cursor<'a> {
        Cursor { rest: text }
    }

    fn skip_ws(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.rest.chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.rest = &self.rest[c.len_utf8()..];
            true
        } else {
            false
        }
    }

    fn punct(&mut self, c: char) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected `{c}` at `{}`", self.context()))
        }
    }

    fn context(&self) -> String {
        let s: String = self.rest.chars().take(24).collect();
        if s.is_empty() {
            "end of line".into()
        } else {
            s
        }
    }

    fn end(&mut self) -> Result<(), String> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(format!("unexpected text `{}`", self.context())),
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        self.skip_ws();
        let end = self.rest.find(|c: char| !f(c)).unwrap_or(self.rest.len());
        let (word, rest) = self.rest.split_at(end);
        self.rest = rest;
        word
    }

    fn ident(&mut self) -> Result<String, String> {
        let word = self.take_while(|c| c.is_ascii_alphanumeric() || c == '_');
        if word.is_empty() || word.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("expected a name at `{}`", self.context()));
        }
        Ok(word.to_string())
    }

    fn keyword(&mut self, kw: &str) -> Result<(), String> {
        if self.try_keyword(kw) {
            Ok(())
        } else {
            Err(format!("expected `{kw}` at `{}`", self.context()))
        }
    }

    fn try_keyword(&mut self, kw: &str) -> bool {
        self.skip_ws();
        let after = self.rest.strip_prefix(kw);
        match after {
            Some(rest) if !rest.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') => {
                self.rest = rest;
                true
            }
            _ => false,
        }
    }

    fn value_name(&mut self) -> Result<String, String> {
        self.punct('%')?;
        let name = self.take_while(is_value_char);
        if name.is_empty() {
            return Err(format!("expected a value name after `%` at `{}`", self.context()));
        }
        Ok(name.to_string())
    }

    /// A double-quoted string with Rust/JSON-style escapes (`\"`, `\\`, `\n`, `\t`, `\u{..}`).
    fn string(&mut self) -> Result<String, String> {
        self.punct('"')?;
        let mut out = String::new();
        let mut chars = self.rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &self.rest[i + 1..];
                    return Ok(out);
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some('0') => out.push('\0'),
                    Some('\'') => out.push('\''),
                    Some('u') => {
                        let rest: String = chars.by_ref().map(|(_, c)| c).take_while(|c| *c != '}').collect();
                        let hex = rest.strip_prefix('{').ok_or("bad \\u escape")?;
                        let code = u32::from_str_radix(hex, 16).map_err(|_| "bad \\u escape")?;
                        out.push(char::from_u32(code).ok_or("bad \\u escape")?);
                    }
                    _ => return Err("unknown escape in string".into()),
                },
                c => out.push(c),
            }
        }
        Err("unterminated string".into())
    }

    fn dim_list(&mut self) -> Result<Vec<Dim>, String> {
        self.punct('[')?;
        let mut dims = Vec::new();
        if self.eat(']') {
            return Ok(dims);
        }
        loop {
            let text = self.take_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == '+' || c == '*');
            dims.push(Dim::parse(text).ok_or_else(|| format!("bad dimension `{text}`"))?);
            if self.eat(']') {
                return Ok(dims);
            }
            self.punct(',')?;
        }
    }

    /// A bracketed list is of floats when its first item is a number with a `.` or an
    /// exponent (the printer writes every float so); dimensions are integers or names.
    fn list_holds_floats(&self) -> bool {
        let inner = self.rest.trim_start().strip_prefix('[').unwrap_or("");
        let first = inner.split([',', ']']).next().unwrap_or("").trim();
        first.starts_with(|c: char| c.is_ascii_digit() || c == '-')
            && first.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
            && first.contains(['.', 'e', 'E'])
    }

    fn float_list(&mut self) -> Result<Vec<f32>, String> {
        self.punct('[')?;
        let mut values = Vec::new();
        loop {
            let text = self.take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.'));
            values.push(text.parse::<f32>().map_err(|_| format!("bad number `{text}` in a list"))?);
            if self.eat(']') {
                return Ok(values);
            }
            self.punct(',')?;
        }
    }

    fn tensor_type(&mut self) -> Result<TensorType, String> {
        let dtype_name = self.ident()?;
        let dtype = DType::from_name(&dtype_name).ok_or_else(|| format!("unknown dtype `{dtype_name}`"))?;
        Ok(TensorType::new(dtype, self.dim_list()?))
    }

    fn attr(&mut self) -> Result<Attr, String> {
        match self.peek() {
            Some('"') => Ok(Attr::Str(self.string()?)),
            Some('[') if self.list_holds_floats() => Ok(Attr::Floats(self.float_list()?)),
            Some('[') => Ok(Attr::Dims(self.dim_list()?)),
            Some(c) if c.is_ascii_digit() || c == '-' => {
                let text = self.take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.'));
                if text.contains(['.', 'e', 'E']) || text.contains("inf") || text.contains("NaN") {
                    text.parse::<f32>().map(Attr::Float).map_err(|_| format!("bad number `{text}`"))
                } else {
                    text.parse::<i64>().map(Attr::Int).map_err(|_| format!("bad integer `{text}`"))
                }
            }
            _ => Ok(Attr::Ident(self.ident()?)),
        }
    }
}

fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{verify, VerifyError};

    const SMALL: &str = r#"graph "small" {
  %emb = weight "embed" : f16[10, 4]
  %tokens = input "tokens" : i32[s]
  %x = embed(%emb, %tokens) : f32[s, 4]
  %norm.w = weight "norm" : f32[4]
  %y = rms_norm(%x, %norm.w) {eps = 1e-5} : f32[s, 4]
  %h = reshape(%y) {shape = [s, 2, 2]} : f32[s, 2, 2]
  %pos = positions(%tokens) : i32[s]
  %r = rope(%h, %pos) {theta = 10000.0, rotary_dim = 2, style = half} : f32[s, 2, 2]
  %k = kv_append(%r) {layer = 0, kind = key} : f32[p+s, 2, 2]
  output "logits" = %y
}
"#;

    #[test]
    fn print_parse_print_is_identical() {
        let g = parse(SMALL).unwrap();
        verify(&g).unwrap();
        assert_eq!(print(&g), SMALL);
    }

    #[test]
    fn float_attributes_past_f32_are_refused() {
        // 1e60 reads as infinity in f32, which prints as `inf` and never parses back.
        let text =
            SMALL.replace("theta = 10000.0", "theta = 1000000000000000000000000000000000000000000000000000000000000.0");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("must be a finite number"), "{e}");
    }

    const LONG_ROPE: &str = "theta = 10000.0, rotary_dim = 2, style = half, scaling = longrope, \
        short_factor = [1.5], long_factor = [0.00325], original_max_position = 32, attention_factor = 1.264911";

    #[test]
    fn longrope_factor_lists_round_trip() {
        let text = SMALL.replace("theta = 10000.0, rotary_dim = 2, style = half", LONG_ROPE);
        let g = parse(&text).unwrap();
        verify(&g).unwrap();
        assert_eq!(print(&g), text);
        // Dimension lists stay dimension lists; an exponent reads as the same float.
        assert!(print(&g).contains("{shape = [s, 2, 2]}"));
        assert_eq!(print(&parse(&text.replace("[0.00325]", "[3.25e-3]")).unwrap()), text);
    }

    #[test]
    fn longrope_lists_that_do_not_fit_the_rotation_are_refused() {
        let two =
            SMALL.replace("theta = 10000.0, rotary_dim = 2, style = half", &LONG_ROPE.replace("[1.5]", "[1.5, 2.0]"));
        let e = verify(&parse(&two).unwrap()).unwrap_err().to_string();
        assert!(e.contains("%r") && e.contains("short_factor has 2 entries; rotary_dim 2 needs 1"), "{e}");
        let negative =
            SMALL.replace("theta = 10000.0, rotary_dim = 2, style = half", &LONG_ROPE.replace("[1.5]", "[-1.5]"));
        let e = verify(&parse(&negative).unwrap()).unwrap_err().to_string();
        assert!(e.contains("positive and finite"), "{e}");
        let infinite =
            SMALL.replace("theta = 10000.0, rotary_dim = 2, style = half", &LONG_ROPE.replace("[1.5]", "[1.5e99]"));
        let e = parse(&infinite).unwrap_err();
        assert!(e.message.contains("list of finite numbers"), "{e}");
    }

    #[test]
    fn operands_on_a_source_are_refused_not_dropped() {
        let text = SMALL.replace("input \"tokens\" : i32[s]", "input \"tokens\"(%emb) : i32[s]");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("%tokens") && e.message.contains("takes 0 operands"), "{e}");
    }

    #[test]
    fn dangling_operand_names_the_node() {
        let text = SMALL.replace("embed(%emb, %tokens)", "embed(%emb, %nowhere)");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("%x") && e.message.contains("%nowhere"), "{e}");
    }

    #[test]
    fn cycle_is_reported_by_the_verifier() {
        let text = SMALL.replace("rms_norm(%x, %norm.w)", "rms_norm(%h, %norm.w)");
        let g = parse(&text).unwrap();
        assert!(matches!(verify(&g), Err(VerifyError::Cycle { .. })));
    }

    #[test]
    fn shape_and_dtype_mismatches_name_the_node() {
        let text = SMALL.replace("%norm.w = weight \"norm\" : f32[4]", "%norm.w = weight \"norm\" : f32[5]");
        let e = verify(&parse(&text).unwrap()).unwrap_err().to_string();
        assert!(e.contains("%y"), "{e}");
        let text = SMALL.replace(
            "%y = rms_norm(%x, %norm.w) {eps = 1e-5} : f32[s, 4]",
            "%y = rms_norm(%x, %norm.w) {eps = 1e-5} : f16[s, 4]",
        );
        let e = verify(&parse(&text).unwrap()).unwrap_err().to_string();
        assert!(e.contains("%y") && e.contains("declared type f16[s, 4]"), "{e}");
    }
}
