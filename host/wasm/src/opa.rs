//! OPA's WebAssembly ABI: a policy compiled by `opa build -t wasm` runs as a validator,
//! unchanged, in the same sandbox as every plugin.
//!
//! Such a module is a core module that imports its memory and a few functions from `env`
//! (`memory`, `opa_abort`, `opa_println`, `opa_builtin0` … `opa_builtin4`) and exports the
//! evaluation (`opa_eval`, ABI 1.2's one-call path; `opa_json_parse`, `opa_json_dump`,
//! `opa_malloc`, `opa_heap_ptr_get`, `builtins`, `entrypoints`). The host gives it:
//!
//! - its memory, capped at the plugin's `limits.memory_mib`;
//! - the built-in functions the policy calls that OPA does not compile into the module,
//!   from [`builtin`] (`sprintf` and a few more); a policy that needs another one fails to
//!   load, naming it — nothing it does not ask for and nothing that reads the host (no
//!   `http.send`, no clock, no environment);
//! - `opa_abort` as a trap with the policy's message; `opa_println` goes nowhere.
//!
//! Per object, the entrypoint is evaluated with an input built from the object:
//! Gatekeeper's `{"review": {"object", "kind", "name", "namespace", "operation"},
//! "parameters"}` for an entrypoint ending `/violation` (a ConstraintTemplate's rule), the
//! object itself otherwise. What the entrypoint returns becomes findings: a set of
//! `{"msg": …}` (Gatekeeper) or of strings (`deny`), one finding each; `false` (an `allow`
//! rule) one finding; an empty set, `true` or undefined, none.
//!
//! The plugin's `config`: `entrypoint` (default: the module's only one), `parameters`
//! (Gatekeeper's `input.parameters`) and `data` (the policy's `data`, loaded once per call).

use serde_json::{Value, json};
use wasmtime::{Caller, Engine, Extern, Linker, Memory, MemoryType, Module, Store};

use super::Limits;

/// True when `module` is an OPA policy (imports `env.memory`, exports `opa_eval`).
pub fn is_opa(module: &Module) -> bool {
    module
        .imports()
        .any(|i| i.module() == "env" && i.name() == "memory")
        && module.get_export("opa_eval").is_some()
}

/// Per call: the store's limits and the policy's memory.
pub struct State {
    limits: wasmtime::StoreLimits,
    memory: Option<Memory>,
    /// Builtin names by the ids the module gave them.
    builtins: Vec<(i32, String)>,
    /// What `opa_abort` said.
    aborted: Option<String>,
}

/// A compiled policy and what it told at load.
pub struct PolicyPre {
    module: Module,
    memory_pages: u64,
    /// Its entrypoints, by name.
    pub entrypoints: Vec<(String, i32)>,
    builtins: Vec<(String, i32)>,
}

/// The host functions the module imports.
fn linker(engine: &Engine) -> Result<Linker<State>, String> {
    let mut linker: Linker<State> = Linker::new(engine);
    let e = |e: wasmtime::Error| format!("{e:#}");
    linker
        .func_wrap(
            "env",
            "opa_abort",
            |mut caller: Caller<'_, State>, addr: i32| -> wasmtime::Result<()> {
                let message = read_cstr(&mut caller, addr).unwrap_or_default();
                caller.data_mut().aborted = Some(message.clone());
                Err(wasmtime::Error::msg(format!(
                    "the policy aborted: {message}"
                )))
            },
        )
        .map_err(e)?;
    linker
        .func_wrap("env", "opa_println", |_: Caller<'_, State>, _: i32| {})
        .map_err(e)?;
    macro_rules! builtin {
        ($name:literal, $($arg:ident),*) => {
            linker
                .func_wrap_async(
                    "env",
                    $name,
                    |mut caller: Caller<'_, State>, (id, _ctx, $($arg),*): (i32, i32, $(builtin!(@ty $arg)),*)| {
                        Box::new(async move {
                            let args = vec![$(dump_term(&mut caller, $arg).await?),*];
                            let name = caller
                                .data()
                                .builtins
                                .iter()
                                .find(|(i, _)| *i == id)
                                .map(|(_, n)| n.clone())
                                .unwrap_or_default();
                            let out = builtin(&name, &args).map_err(wasmtime::Error::msg)?;
                            parse(&mut caller, &out).await
                        })
                    },
                )
                .map_err(e)?;
        };
        (@ty $arg:ident) => { i32 };
    }
    builtin!("opa_builtin0",);
    builtin!("opa_builtin1", a);
    builtin!("opa_builtin2", a, b);
    builtin!("opa_builtin3", a, b, c);
    builtin!("opa_builtin4", a, b, c, d);
    Ok(linker)
}

/// Links a compiled policy, and asks it (once, within `limits`) for its entrypoints and
/// the builtins it needs from the host.
///
/// # Errors
/// A module that imports what OPA's do not, or needs a builtin the host does not give.
pub fn prepare(engine: &Engine, module: &Module, limits: &Limits) -> Result<PolicyPre, String> {
    let memory_pages = module
        .imports()
        .find_map(|i| match i.ty() {
            wasmtime::ExternType::Memory(m) if i.module() == "env" && i.name() == "memory" => {
                Some(m.minimum())
            }
            _ => None,
        })
        .unwrap_or(2);
    // The memory is the store's own, defined per call (see `instantiate`).
    let unknown: Vec<String> = module
        .imports()
        .filter(|i| {
            i.module() != "env"
                || !matches!(
                    i.name(),
                    "memory"
                        | "opa_abort"
                        | "opa_println"
                        | "opa_builtin0"
                        | "opa_builtin1"
                        | "opa_builtin2"
                        | "opa_builtin3"
                        | "opa_builtin4"
                )
        })
        .map(|i| format!("{}.{}", i.module(), i.name()))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "an OPA policy imports only env.memory and OPA's env functions; this one imports {}",
            unknown.join(", ")
        ));
    }
    let mut pre = PolicyPre {
        module: module.clone(),
        memory_pages,
        entrypoints: Vec::new(),
        builtins: Vec::new(),
    };
    let (entrypoints, builtins) = super::finish(limits, async {
        let (mut store, instance) = instantiate(engine, &pre, limits).await?;
        let entry = object_export(&mut store, &instance, "entrypoints").await?;
        let needed = object_export(&mut store, &instance, "builtins").await?;
        Ok((entry, needed))
    })
    .map_err(|e| format!("{e:#}"))?;
    pre.entrypoints = ids(&entrypoints);
    pre.builtins = ids(&builtins);
    let missing: Vec<&str> = pre
        .builtins
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !SUPPORTED.contains(n))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the policy calls built-in functions the host does not give: {} (given: {})",
            missing.join(", "),
            SUPPORTED.join(", ")
        ));
    }
    Ok(pre)
}

/// `{"name": id, …}` as (name, id) pairs.
fn ids(v: &Value) -> Vec<(String, i32)> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), i32::try_from(v.as_i64()?).ok()?)))
        .collect()
}

async fn instantiate(
    engine: &Engine,
    pre: &PolicyPre,
    limits: &Limits,
) -> wasmtime::Result<(Store<State>, wasmtime::Instance)> {
    let mut store = Store::new(
        engine,
        State {
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .instances(2)
                .tables(4)
                .memories(1)
                .trap_on_grow_failure(true)
                .build(),
            memory: None,
            builtins: pre.builtins.iter().map(|(n, i)| (*i, n.clone())).collect(),
            aborted: None,
        },
    );
    store.limiter(|s| &mut s.limits);
    store.set_epoch_deadline((limits.timeout.as_millis() / super::TICK.as_millis()).max(1) as u64);
    store.epoch_deadline_trap();
    let memory = Memory::new(&mut store, MemoryType::new(pre.memory_pages as u32, None))?;
    store.data_mut().memory = Some(memory);
    // The memory is an import: the linker of `prepare` cannot know this store's.
    let mut linker = linker(engine).map_err(wasmtime::Error::msg)?;
    linker.define(&store, "env", "memory", memory)?;
    let instance = linker.instantiate_async(&mut store, &pre.module).await?;
    Ok((store, instance))
}

/// Calls an export returning a value address, and reads the value as JSON.
async fn object_export(
    store: &mut Store<State>,
    instance: &wasmtime::Instance,
    name: &str,
) -> wasmtime::Result<Value> {
    let f = instance.get_typed_func::<(), i32>(&mut *store, name)?;
    let addr = f.call_async(&mut *store, ()).await?;
    let dump = instance.get_typed_func::<i32, i32>(&mut *store, "opa_json_dump")?;
    let text = dump.call_async(&mut *store, addr).await?;
    let memory = store.data().memory.expect("set at instantiation");
    let s = cstr(memory.data(&*store), text)?;
    Ok(serde_json::from_str(&s)?)
}

/// Evaluates `entrypoint` once per input, in one instance (the data loaded once, the heap
/// reset between inputs). Returns each input's result set (`[{"result": …}]`, or `[]` when
/// undefined).
///
/// # Errors
/// A trap, the deadline, the memory cap, or what the policy aborted with.
pub async fn eval_all(
    engine: &Engine,
    pre: &PolicyPre,
    entrypoint: i32,
    data: &Value,
    inputs: &[Value],
    limits: &Limits,
) -> wasmtime::Result<Vec<Value>> {
    let (mut store, instance) = instantiate(engine, pre, limits).await?;
    let malloc = instance.get_typed_func::<i32, i32>(&mut store, "opa_malloc")?;
    let parse = instance.get_typed_func::<(i32, i32), i32>(&mut store, "opa_json_parse")?;
    let heap_get = instance.get_typed_func::<(), i32>(&mut store, "opa_heap_ptr_get")?;
    let eval = instance
        .get_typed_func::<(i32, i32, i32, i32, i32, i32, i32), i32>(&mut store, "opa_eval")?;
    let memory = store.data().memory.expect("set at instantiation");
    let text = data.to_string();
    let at = malloc.call_async(&mut store, len(&text)?).await?;
    memory.write(&mut store, at as usize, text.as_bytes())?;
    let data_addr = parse.call_async(&mut store, (at, len(&text)?)).await?;
    let heap = heap_get.call_async(&mut store, ()).await?;
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        let text = input.to_string();
        let n = len(&text)?;
        // The input goes where the heap starts; the evaluation allocates after it, and
        // everything it allocated is dropped for the next input.
        let need = heap as usize + text.len() + (1 << 16);
        let have = memory.data_size(&store);
        if need > have {
            let pages = (need - have).div_ceil(1 << 16) as u64;
            memory.grow_async(&mut store, pages).await?;
        }
        memory.write(&mut store, heap as usize, text.as_bytes())?;
        let result = eval
            .call_async(&mut store, (0, entrypoint, data_addr, heap, n, heap + n, 0))
            .await?;
        let s = cstr(memory.data(&store), result)?;
        out.push(serde_json::from_str(&s)?);
    }
    Ok(out)
}

fn len(s: &str) -> wasmtime::Result<i32> {
    i32::try_from(s.len()).map_err(|_| wasmtime::Error::msg("an input over 2 GiB"))
}

/// The NUL-terminated string at `addr`.
fn cstr(mem: &[u8], addr: i32) -> wasmtime::Result<String> {
    let start = usize::try_from(addr).map_err(|_| wasmtime::Error::msg("a negative address"))?;
    let tail = mem
        .get(start..)
        .ok_or_else(|| wasmtime::Error::msg("an address past the memory"))?;
    let end = tail
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| wasmtime::Error::msg("an unterminated string"))?;
    Ok(String::from_utf8_lossy(&tail[..end]).into_owned())
}

fn read_cstr(caller: &mut Caller<'_, State>, addr: i32) -> Option<String> {
    let memory = caller.data().memory?;
    cstr(memory.data(&*caller), addr).ok()
}

fn export<'a>(caller: &mut Caller<'a, State>, name: &str) -> wasmtime::Result<wasmtime::Func> {
    match caller.get_export(name) {
        Some(Extern::Func(f)) => Ok(f),
        _ => Err(wasmtime::Error::msg(format!(
            "the policy exports no {name}"
        ))),
    }
}

/// A value of the policy's heap as a Rego term (`opa_value_dump`: sets stay sets, which
/// JSON would make arrays).
async fn dump_term(caller: &mut Caller<'_, State>, addr: i32) -> wasmtime::Result<Term> {
    let f = export(caller, "opa_value_dump")?.typed::<i32, i32>(&*caller)?;
    let text = f.call_async(&mut *caller, addr).await?;
    let s = read_cstr(caller, text).ok_or_else(|| wasmtime::Error::msg("a bad string"))?;
    Term::parse(&s).map_err(wasmtime::Error::msg)
}

/// A JSON value onto the policy's heap; its address.
async fn parse(caller: &mut Caller<'_, State>, v: &Value) -> wasmtime::Result<i32> {
    let text = v.to_string();
    let n = len(&text)?;
    let malloc = export(caller, "opa_malloc")?.typed::<i32, i32>(&*caller)?;
    let at = malloc.call_async(&mut *caller, n).await?;
    let memory = caller
        .data()
        .memory
        .ok_or_else(|| wasmtime::Error::msg("no memory"))?;
    memory.write(&mut *caller, at as usize, text.as_bytes())?;
    let parse = export(caller, "opa_json_parse")?.typed::<(i32, i32), i32>(&*caller)?;
    parse.call_async(&mut *caller, (at, n)).await
}

/// The built-in functions the host gives a policy.
pub const SUPPORTED: [&str; 2] = ["sprintf", "trace"];

/// Runs a built-in function the module left to the host; its result is JSON.
///
/// # Errors
/// An unknown builtin, or arguments it does not take.
pub fn builtin(name: &str, args: &[Term]) -> Result<Value, String> {
    match (name, args) {
        ("sprintf", [Term::Str(format), Term::Arr(values)]) => {
            Ok(Value::String(sprintf(format, values)))
        }
        ("trace", [_]) => Ok(Value::Bool(true)),
        _ => Err(format!(
            "built-in function {name} with these arguments is not given"
        )),
    }
}

/// A Rego value as `opa_value_dump` writes it: JSON, plus sets (`{a, b}`, `set()`).
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    /// `null`.
    Null,
    /// `true`, `false`.
    Bool(bool),
    /// A number, as written.
    Num(String),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Term>),
    /// An object.
    Obj(Vec<(Term, Term)>),
    /// A set.
    Set(Vec<Term>),
}

impl Term {
    /// Reads a term.
    ///
    /// # Errors
    /// Text that is not one.
    pub fn parse(text: &str) -> Result<Term, String> {
        let mut p = TermParser {
            s: text.as_bytes(),
            i: 0,
        };
        let t = p.term()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing text in a Rego value: {text:?}"));
        }
        Ok(t)
    }

    /// As Go's `%v` prints it in OPA's `sprintf`: strings bare at the top, numbers as
    /// written, collections in Rego's syntax (`["a", 1]`, `{"a", "b"}`, `{"k": 1}`).
    fn top(&self) -> String {
        match self {
            Term::Str(s) => s.clone(),
            other => other.rego(),
        }
    }

    fn rego(&self) -> String {
        let join = |items: &[Term]| items.iter().map(Term::rego).collect::<Vec<_>>().join(", ");
        match self {
            Term::Null => "null".into(),
            Term::Bool(b) => b.to_string(),
            Term::Num(n) => n.clone(),
            Term::Str(s) => Value::String(s.clone()).to_string(),
            Term::Arr(a) => format!("[{}]", join(a)),
            Term::Set(s) if s.is_empty() => "set()".into(),
            // Go's OPA prints sets and objects in its term order; the module's dump does not.
            Term::Set(s) => {
                let mut s = s.clone();
                s.sort_by(Term::order);
                format!("{{{}}}", join(&s))
            }
            Term::Obj(o) => format!(
                "{{{}}}",
                sorted_pairs(o)
                    .iter()
                    .map(|(k, v)| format!("{}: {}", k.rego(), v.rego()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl Term {
    /// OPA's order of terms (`ast.Compare`): null, booleans, numbers, strings, arrays,
    /// objects, sets; then by value.
    fn order(a: &Term, b: &Term) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let rank = |t: &Term| match t {
            Term::Null => 0,
            Term::Bool(_) => 1,
            Term::Num(_) => 2,
            Term::Str(_) => 3,
            Term::Arr(_) => 4,
            Term::Obj(_) => 5,
            Term::Set(_) => 6,
        };
        let list = |x: &[Term], y: &[Term]| {
            for (p, q) in x.iter().zip(y) {
                let o = Term::order(p, q);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        };
        match (a, b) {
            (Term::Bool(x), Term::Bool(y)) => x.cmp(y),
            (Term::Num(x), Term::Num(y)) => {
                let (x, y) = (
                    x.parse::<f64>().unwrap_or(0.0),
                    y.parse::<f64>().unwrap_or(0.0),
                );
                x.partial_cmp(&y).unwrap_or(Ordering::Equal)
            }
            (Term::Str(x), Term::Str(y)) => x.cmp(y),
            (Term::Arr(x), Term::Arr(y)) => list(x, y),
            (Term::Set(x), Term::Set(y)) => {
                let (mut x, mut y) = (x.clone(), y.clone());
                x.sort_by(Term::order);
                y.sort_by(Term::order);
                list(&x, &y)
            }
            (Term::Obj(x), Term::Obj(y)) => {
                let flat = |o: &[(Term, Term)]| -> Vec<Term> {
                    sorted_pairs(o)
                        .into_iter()
                        .flat_map(|(k, v)| [k.clone(), v.clone()])
                        .collect()
                };
                list(&flat(x), &flat(y))
            }
            _ => rank(a).cmp(&rank(b)),
        }
    }
}

fn sorted_pairs(o: &[(Term, Term)]) -> Vec<&(Term, Term)> {
    let mut pairs: Vec<&(Term, Term)> = o.iter().collect();
    pairs.sort_by(|(a, _), (b, _)| Term::order(a, b));
    pairs
}

struct TermParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl TermParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn term(&mut self) -> Result<Term, String> {
        self.ws();
        let rest = &self.s[self.i..];
        for (word, t) in [
            (&b"null"[..], Term::Null),
            (b"true", Term::Bool(true)),
            (b"false", Term::Bool(false)),
            (b"set()", Term::Set(Vec::new())),
        ] {
            if rest.starts_with(word) {
                self.i += word.len();
                return Ok(t);
            }
        }
        match rest.first() {
            Some(b'"') => {
                let start = self.i;
                self.i += 1;
                while let Some(&c) = self.s.get(self.i) {
                    self.i += 1;
                    match c {
                        b'\\' => self.i += 1,
                        b'"' => {
                            let text = std::str::from_utf8(&self.s[start..self.i])
                                .map_err(|e| e.to_string())?;
                            return serde_json::from_str(text)
                                .map(Term::Str)
                                .map_err(|e| e.to_string());
                        }
                        _ => {}
                    }
                }
                Err("an unterminated string".into())
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                if !self.eat(b']') {
                    loop {
                        items.push(self.term()?);
                        if self.eat(b']') {
                            break;
                        }
                        if !self.eat(b',') {
                            return Err("expected , or ] in an array".into());
                        }
                    }
                }
                Ok(Term::Arr(items))
            }
            Some(b'{') => {
                self.i += 1;
                if self.eat(b'}') {
                    return Ok(Term::Obj(Vec::new()));
                }
                let first = self.term()?;
                if self.eat(b':') {
                    let mut pairs = vec![(first, self.term()?)];
                    while self.eat(b',') {
                        let k = self.term()?;
                        if !self.eat(b':') {
                            return Err("expected : in an object".into());
                        }
                        pairs.push((k, self.term()?));
                    }
                    if !self.eat(b'}') {
                        return Err("expected } after an object".into());
                    }
                    Ok(Term::Obj(pairs))
                } else {
                    let mut items = vec![first];
                    while self.eat(b',') {
                        items.push(self.term()?);
                    }
                    if !self.eat(b'}') {
                        return Err("expected } after a set".into());
                    }
                    Ok(Term::Set(items))
                }
            }
            Some(c) if c.is_ascii_digit() || *c == b'-' => {
                let start = self.i;
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || b"-+.eE".contains(c))
                {
                    self.i += 1;
                }
                Ok(Term::Num(
                    String::from_utf8_lossy(&self.s[start..self.i]).into_owned(),
                ))
            }
            _ => Err(format!(
                "not a Rego value at {:?}",
                String::from_utf8_lossy(&rest[..rest.len().min(20)])
            )),
        }
    }
}

/// Go's `fmt.Sprintf` for the verbs policies use, as OPA's `sprintf` gives it its
/// arguments: `%v`, `%s` (a string bare, anything else in Rego's syntax), `%d`, `%q`, `%%`.
pub fn sprintf(format: &str, values: &[Term]) -> String {
    let mut out = String::new();
    let mut args = values.iter();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(verb @ ('v' | 's' | 'd' | 'q')) => match args.next() {
                Some(v) => {
                    let plain = v.top();
                    if verb == 'q' {
                        out.push_str(&format!("{plain:?}"));
                    } else {
                        out.push_str(&plain);
                    }
                }
                None => out.push_str(&format!("%!{verb}(MISSING)")),
            },
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The input for `entrypoint` and `object`: Gatekeeper's review for a `…/violation` rule,
/// the object itself otherwise.
pub fn input(entrypoint: &str, object: &Value, parameters: &Value) -> Value {
    if !entrypoint.ends_with("/violation") {
        return object.clone();
    }
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    json!({
        "review": {
            "object": object,
            "kind": {"group": group, "version": version, "kind": object["kind"]},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"].as_str().unwrap_or_default(),
            "operation": "CREATE",
        },
        "parameters": parameters,
    })
}

/// The messages of one result set: a set of `{"msg"}` or strings, one each; `false`, one;
/// `true`, an empty set or undefined, none.
pub fn messages(entrypoint: &str, result_set: &Value) -> Vec<String> {
    let Some(result) = result_set.get(0).map(|r| &r["result"]) else {
        return Vec::new();
    };
    match result {
        Value::Bool(false) => vec![format!("{entrypoint} is false")],
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                Value::Object(o) => o
                    .get("msg")
                    .and_then(Value::as_str)
                    .map_or_else(|| i.to_string(), str::to_string),
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sprintf_formats_as_opa_does_for_the_verbs_policies_use() {
        let t = |s: &str| Term::parse(s).expect("a term");
        assert_eq!(
            sprintf(
                "container <%v> has no %s; %d%% of %q",
                &[t("\"web\""), t("\"limits\""), t("50"), t("\"x\"")]
            ),
            "container <web> has no limits; 50% of \"x\""
        );
        // What `opa eval` prints for sprintf("x %v %v %v", [{"a","b"}, ["q", 1], {"k": {"z"}}]).
        assert_eq!(
            sprintf(
                "x %v %v %v",
                &[t("{\"a\",\"b\"}"), t("[\"q\",1]"), t("{\"k\":{\"z\"}}")]
            ),
            "x {\"a\", \"b\"} [\"q\", 1] {\"k\": {\"z\"}}"
        );
        assert_eq!(sprintf("%v", &[t("set()")]), "set()");
        assert_eq!(
            sprintf(
                "%v %v",
                &[t("{\"team\",\"owner\",1}"), t("{\"b\":1,\"a\":2}")]
            ),
            "{1, \"owner\", \"team\"} {\"a\": 2, \"b\": 1}"
        );
        assert_eq!(sprintf("%v and %v", &[t("1")]), "1 and %!v(MISSING)");
        assert!(Term::parse("{1,").is_err());
    }

    #[test]
    fn a_violation_rule_gets_gatekeepers_review_and_others_the_object() {
        let o = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "prod"}});
        let i = input(
            "k8srequiredlabels/violation",
            &o,
            &json!({"labels": ["team"]}),
        );
        assert_eq!(
            i["review"]["kind"],
            json!({"group": "apps", "version": "v1", "kind": "Deployment"})
        );
        assert_eq!(i["review"]["namespace"], "prod");
        assert_eq!(i["parameters"]["labels"][0], "team");
        let core = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        assert_eq!(
            input("a/violation", &core, &Value::Null)["review"]["kind"]["group"],
            ""
        );
        assert_eq!(input("policy/deny", &o, &Value::Null), o);
    }

    #[test]
    fn result_sets_become_messages() {
        assert_eq!(
            messages(
                "x/violation",
                &json!([{"result": [{"msg": "no team label", "details": {}}]}])
            ),
            ["no team label"]
        );
        assert_eq!(
            messages("policy/deny", &json!([{"result": ["a", "b"]}])),
            ["a", "b"]
        );
        assert_eq!(
            messages("policy/allow", &json!([{"result": false}])),
            ["policy/allow is false"]
        );
        assert!(messages("policy/allow", &json!([{"result": true}])).is_empty());
        assert!(messages("policy/deny", &json!([])).is_empty());
    }
}
