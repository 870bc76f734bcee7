//! The maintainer: the one thread that owns every view's state. It takes micro-batches
//! of durable events from the feed, applies them to the views in dependency order
//! (cheapest first), publishes each view's change set, runs recompute views on their
//! interval, and creates, drops and restores views.

// The maintainer works on the views module's own types, constants and imports
// throughout.
use super::*;

/// A view as the maintainer holds it.
pub(super) struct Running {
    pub(super) shared: Arc<ViewShared>,
    /// Maintained by operators (in `shared`'s state) rather than recomputed.
    pub(super) incremental: bool,
    /// What applying a batch to this view costs, in nanoseconds (a moving average).
    pub(super) cost_ns: f64,
    /// Per stream read, the last WAL position applied.
    pub(super) positions: BTreeMap<String, u64>,
    pub(super) next_recompute: Instant,
    /// Has a temporal filter: the clock is one of its inputs.
    pub(super) temporal: bool,
    /// The stored checkpoint chain holds this view's state, so the next checkpoint may
    /// write only what changed; false for a view created or rebuilt since.
    pub(super) in_chain: bool,
}

impl Running {
    pub(super) fn name(&self) -> &str {
        &self.shared.name
    }
}

pub(super) struct Maintainer {
    pub(super) host: Arc<dyn WeakHost>,
    pub(super) views: Vec<Running>,
    pub(super) rx: mpsc::Receiver<Msg>,
    pub(super) dirty: bool,
    /// The checkpoint being written to the store, off this thread.
    /// A compacted checkpoint chain comes back from it.
    pub(super) writing: Option<std::thread::JoinHandle<crate::Result<Option<Chain>>>>,
    /// The checkpoint being encoded, a slice after each batch, before it is written.
    pub(super) slicing: Option<super::checkpoint::Slicing>,
    /// Callers waiting for a checkpoint that has not started yet, and those waiting
    /// for the one being encoded or written.
    pub(super) asked: Vec<Answer>,
    pub(super) answering: Vec<Answer>,
    /// The size of the last checkpoint, to size the next one's buffer at once.
    pub(super) last_checkpoint_bytes: usize,
    /// The checkpoint files in the store.
    pub(super) chain: Chain,
    /// Where operator state goes past the memory limit (none: no limit).
    pub(super) spill: Option<Arc<super::spill::Spill>>,
    /// When the state was last weighed against the limit.
    pub(super) bounded: Instant,
}

/// Where the result of a requested checkpoint goes.
pub(super) type Answer = oneshot::Sender<crate::Result<()>>;

impl Maintainer {
    pub(super) fn host(&self) -> Option<Host> {
        self.host.upgrade()
    }

    pub(super) fn run(&mut self) {
        let mut last_checkpoint = Instant::now();
        let mut held: Option<Msg> = None;
        loop {
            let Some(host) = self.host() else { return };
            let options = host.views().options.clone();
            drop(host);
            let now = Instant::now();
            let next_recompute = self
                .views
                .iter()
                .filter(|v| !v.incremental)
                .map(|v| v.next_recompute)
                .min();
            let next_checkpoint = last_checkpoint + options.checkpoint_interval;
            let deadline = next_recompute
                .map_or(next_checkpoint, |r| r.min(next_checkpoint))
                .min(self.next_tick(&options.clock, now))
                .max(now);
            // A checkpoint being encoded goes on as soon as nothing else waits.
            let wait = if self.slicing.is_some() {
                Duration::ZERO
            } else if self.writing.is_some() && !self.answering.is_empty() {
                // Someone waits for the write: look at it often.
                (deadline - now).min(Duration::from_millis(2))
            } else {
                deadline - now
            };
            let msg = match held.take() {
                Some(m) => Ok(m),
                None => self.rx.recv_timeout(wait),
            };
            match msg {
                Ok(Msg::Event(first)) => {
                    let mut events = vec![first];
                    let mut rows = events[0].batch.num_rows();
                    while rows < MAX_BATCH_ROWS {
                        match self.rx.try_recv() {
                            Ok(Msg::Event(e)) => {
                                rows += e.batch.num_rows();
                                events.push(e);
                            }
                            Ok(other) => {
                                held = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.apply_events(events);
                }
                Ok(Msg::Create {
                    name,
                    sql,
                    if_not_exists,
                    reply,
                }) => {
                    let _ = reply.send(self.create(&name, &sql, if_not_exists, true));
                }
                Ok(Msg::Drop {
                    name,
                    if_exists,
                    reply,
                }) => {
                    let _ = reply.send(self.drop_view(&name, if_exists));
                }
                Ok(Msg::Explain { name, reply }) => {
                    let _ = reply.send(self.explain(&name));
                }
                Ok(Msg::Checkpoint { reply }) => self.asked.push(reply),
                Ok(Msg::Barrier { reply }) => {
                    let _ = reply.send(());
                }
                #[cfg(test)]
                Ok(Msg::Bound { reply }) => {
                    // Rounds move at most `ROUND_BYTES` each; one that frees nothing
                    // means nothing more can go.
                    while self.bound_memory(true) {}
                    let _ = reply.send(());
                }
                Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if let Err(e) = self.finish_checkpoint() {
                        warn!(error = %e, "view checkpoint failed");
                    }
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Temporal filters move with the clock, events or not.
                    if Instant::now() >= deadline && self.views.iter().any(|v| v.temporal) {
                        self.apply_events(Vec::new());
                    }
                }
            }
            let _ = self.bound_memory(false);
            self.encode_slice();
            let now = Instant::now();
            if self
                .views
                .iter()
                .any(|v| !v.incremental && v.next_recompute <= now)
            {
                self.recompute_due();
            }
            if self.writing.as_ref().is_some_and(|h| h.is_finished())
                && let Err(e) = self.finish_checkpoint()
            {
                warn!(error = %e, "view checkpoint failed; will retry");
            }
            // A checkpoint still being encoded or written defers the next one rather
            // than stall.
            let idle = self.writing.is_none() && self.slicing.is_none();
            if idle && !self.asked.is_empty() {
                // Asked for: encoded in slices and written like any other, and answered
                // once written.
                self.answering = std::mem::take(&mut self.asked);
                let started = self.start_checkpoint();
                if started.is_err() || (self.writing.is_none() && self.slicing.is_none()) {
                    self.answer(started.map_err(|e| e.to_string()));
                }
                last_checkpoint = Instant::now();
            } else if idle && now >= last_checkpoint + options.checkpoint_interval {
                if self.dirty
                    && let Err(e) = self.start_checkpoint()
                {
                    warn!(error = %e, "view checkpoint failed; will retry");
                }
                last_checkpoint = Instant::now();
            }
        }
    }

    /// Applies durable events to every view, then publishes the change sets.
    pub(super) fn apply_events(&mut self, events: Vec<Event>) {
        let Some(host) = self.host() else { return };
        let started = Instant::now();
        let acked = events.iter().map(|e| e.acked).min();
        let mut by_stream: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for e in &events {
            by_stream.entry(e.stream.as_str()).or_default().push(e);
        }
        let mut cache: HashMap<(String, u64), ZBatch> = HashMap::new();
        let mut inputs = |stream: &str, after: u64| -> Option<(ZBatch, u64)> {
            let evs = by_stream.get(stream)?;
            let last = evs.last()?.seq;
            if last <= after {
                return None;
            }
            let key = (stream.to_owned(), after);
            if let Some(z) = cache.get(&key) {
                return Some((z.clone(), last));
            }
            let parts: Vec<ZBatch> = evs
                .iter()
                .filter(|e| e.seq > after)
                .map(|e| ZBatch::inserts(e.batch.clone()))
                .collect();
            let z = ZBatch::concat(&parts[0].batch.schema(), &parts).ok()?;
            cache.insert(key, z.clone());
            Some((z, last))
        };
        let mut diffs: HashMap<String, ZBatch> = HashMap::new();
        let mut broken = Vec::new();
        // The clock moves first, so events are judged at the time they are applied.
        let tick = temporal::clock_delta(host.views().options.clock.now() * 1000);
        let ticking = events.is_empty();
        for i in self.batch_order() {
            let run = &mut self.views[i];
            if !run.incremental {
                continue;
            }
            let view_started = Instant::now();
            let mut deltas = Vec::new();
            if run.temporal {
                deltas.push((temporal::CLOCK.to_owned(), tick.clone()));
            }
            for src in &run.shared.reads {
                let delta = if let Some(d) = diffs.get(src) {
                    Some(d.clone())
                } else {
                    let after = run.positions.get(src).copied();
                    match after {
                        Some(after) => inputs(src, after).map(|(z, last)| {
                            run.positions.insert(src.clone(), last);
                            z
                        }),
                        None => None,
                    }
                };
                deltas.extend(delta.map(|d| (src.clone(), d)));
            }
            if ticking && deltas.is_empty() {
                // Neither the clock nor a view it reads moved it.
                continue;
            }
            match advance(&*host, run, &deltas, acked) {
                Ok(Some(diff)) => {
                    diffs.insert(run.shared.name.clone(), diff);
                }
                Ok(None) => {}
                Err(e) => {
                    error!(view = run.name(), error = %e, "view update failed; rebuilding it from its sources");
                    broken.push(i);
                }
            }
            if ticking
                && deltas.len() <= usize::from(run.temporal)
                && !diffs.contains_key(run.name())
            {
                // A tick that changed nothing here: not a batch worth timing.
                continue;
            }
            let spent = view_started.elapsed();
            run.cost_ns = 0.9 * run.cost_ns + 0.1 * spent.as_nanos() as f64;
            run.shared
                .apply_nanos
                .fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
            host.metrics()
                .view_apply_seconds
                .get_or_create(&ViewLabel {
                    view: run.shared.name.clone(),
                })
                .observe(spent.as_secs_f64());
        }
        {
            let mut pending = host.views().feed.pending.lock();
            for _ in 0..events.len() {
                pending.pop_front();
            }
        }
        if ticking {
            self.dirty |= !diffs.is_empty();
        } else {
            self.dirty = true;
            host.metrics()
                .view_batch_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        for i in broken {
            self.rebuild(i);
        }
    }

    /// When the clock next matters to a temporal filter: the earliest instant one has
    /// rows to let in or out, and at least every second while any view has one (the
    /// clock may be moved by other means than waiting, in tests).
    fn next_tick(&self, clock: &crate::clock::Clock, now: Instant) -> Instant {
        let far = now + Duration::from_secs(3600);
        if !self.views.iter().any(|v| v.temporal) {
            return far;
        }
        let due = self
            .views
            .iter()
            .filter(|v| v.temporal)
            .filter_map(|v| v.shared.state.read().node.as_ref()?.next_due())
            .min();
        let every = now + TEMPORAL_TICK;
        match due {
            Some(due_us) => {
                let wait_us = due_us.saturating_sub(clock.now() * 1000).max(0) as u64;
                every.min(now + Duration::from_micros(wait_us))
            }
            None => every,
        }
    }

    /// The order to apply a batch in: every view after the views it reads and, of those
    /// ready, the cheapest first. Each view's change set goes out as soon as it is
    /// applied, and push sends change sets in that order, so an expensive view (a
    /// `DISTINCT ON` over every order line, whose deltas are large) placed early would
    /// hold back the change sets of every cheap view after it.
    pub(super) fn batch_order(&self) -> Vec<usize> {
        let n = self.views.len();
        let index: HashMap<&str, usize> = self
            .views
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name(), i))
            .collect();
        let mut done = vec![false; n];
        let mut order = Vec::with_capacity(n);
        while order.len() < n {
            let ready = (0..n).filter(|&i| {
                !done[i]
                    && self.views[i]
                        .shared
                        .reads
                        .iter()
                        .all(|r| index.get(r.as_str()).is_none_or(|&j| done[j]))
            });
            let Some(next) = ready.min_by(|&a, &b| {
                self.views[a]
                    .cost_ns
                    .total_cmp(&self.views[b].cost_ns)
                    .then(a.cmp(&b))
            }) else {
                // (Cannot happen: a view is created after the views it reads.)
                order.extend((0..n).filter(|&i| !done[i]));
                break;
            };
            done[next] = true;
            order.push(next);
        }
        order
    }

    /// Runs every due recompute view and passes its change to the views reading it.
    pub(super) fn recompute_due(&mut self) {
        let Some(host) = self.host() else { return };
        let interval = host.views().options.recompute_interval;
        let now = Instant::now();
        for i in 0..self.views.len() {
            if self.views[i].incremental || self.views[i].next_recompute > now {
                continue;
            }
            self.views[i].next_recompute = now + interval;
            let sql = self.views[i].shared.sql.clone();
            let result = run_query(&*host, &sql);
            let applied = result.and_then(|batch| {
                let run = &self.views[i];
                let mut state = run.shared.state.write();
                let batch = crate::query::cast_batch(&batch, state.output.schema())?;
                let applied = state.replace(&batch)?;
                Ok((state.bump(&applied), applied))
            });
            match applied {
                Ok((version, applied)) if !applied.is_empty() => {
                    let diff = finish(&*host, &self.views[i], applied, version, None);
                    self.dirty = true;
                    self.propagate(&*host, i, diff);
                }
                Ok(_) => {}
                Err(e) => warn!(view = self.views[i].name(), error = %e, "recompute failed"),
            }
        }
    }

    /// Feeds one view's change to the incremental views after it.
    pub(super) fn propagate(&mut self, host: &dyn ViewHost, from: usize, diff: ZBatch) {
        let mut diffs: HashMap<String, ZBatch> = HashMap::new();
        diffs.insert(self.views[from].shared.name.clone(), diff);
        let mut broken = Vec::new();
        for i in from + 1..self.views.len() {
            let run = &self.views[i];
            let deltas: Vec<(String, ZBatch)> = run
                .shared
                .reads
                .iter()
                .filter_map(|src| Some((src.clone(), diffs.get(src)?.clone())))
                .collect();
            if deltas.is_empty() {
                continue;
            }
            match advance(host, run, &deltas, None) {
                Ok(Some(d)) => {
                    diffs.insert(run.shared.name.clone(), d);
                }
                Ok(None) => {}
                Err(e) => {
                    error!(view = run.name(), error = %e, "view update failed");
                    broken.push(i);
                }
            }
        }
        for i in broken {
            self.rebuild(i);
        }
    }

    /// Refills a view whose state can no longer be trusted, publishing the difference.
    pub(super) fn rebuild(&mut self, i: usize) {
        // The operators are replaced: a checkpoint being encoded takes their changes
        // first.
        self.encode_all();
        let Some(host) = self.host() else { return };
        let sql = self.views[i].shared.sql.clone();
        let name = self.views[i].shared.name.clone();
        match self.build(&*host, &name, &sql) {
            Ok(fresh) => {
                let rows = fresh.shared.snapshot().map(|(_, r)| r);
                let applied = {
                    let mut state = self.views[i].shared.state.write();
                    // The rows now are listed before the operators are swapped: they
                    // may be derived from the old operators' state.
                    let applied = rows.and_then(|rows| state.replace(&rows));
                    state.node = fresh.shared.state.write().node.take();
                    applied.map(|applied| (state.bump(&applied), applied))
                };
                self.views[i].positions = fresh.positions;
                // The fresh operators know nothing of what the old ones held.
                self.views[i].in_chain = false;
                if let Ok((version, applied)) = applied
                    && !applied.is_empty()
                {
                    let diff = finish(&*host, &self.views[i], applied, version, None);
                    self.propagate(&*host, i, diff);
                }
            }
            Err(e) => error!(view = %name, error = %e, "rebuilding the view failed"),
        }
    }

    pub(super) fn source_kind(&self, host: &dyn ViewHost, name: &str) -> Option<SourceKind> {
        if host.stream_schema(name).is_some() {
            return Some(SourceKind::Stream);
        }
        let v = self.views.iter().find(|v| v.name() == name)?;
        let state = v.shared.state.read();
        let keyed = v.shared.key.len() < state.output.schema().fields().len()
            || state.node.as_ref().is_some_and(|n| n.key.is_some());
        Some(SourceKind::View {
            key: keyed.then(|| state.output.key_columns().to_vec()),
        })
    }

    /// Plans a view and fills it from the data as it is now.
    pub(super) fn build(
        &self,
        host: &dyn ViewHost,
        name: &str,
        sql: &str,
    ) -> Result<Running, QueryError> {
        // Its change counter exists from the start (see `EngineMetrics::init_stream`).
        let _ = host.metrics().view_changes_total.get_or_create(&ViewLabel {
            view: name.to_owned(),
        });
        let plan = host
            .query_runtime()
            .block_on(host.view_planner().plan_view(sql))?;
        let compiled = plan::compile(&plan, &host.view_planner().state(), &|n| {
            self.source_kind(host, n)
        });
        let schema: SchemaRef = Arc::clone(plan.schema().inner());
        let mut reads = Vec::new();
        collect_tables(&plan, &mut reads);
        for r in &reads {
            if self.source_kind(host, r).is_none() {
                return Err(QueryError::Invalid(format!(
                    "view {name} reads '{r}', which is neither a stream nor a view"
                )));
            }
        }
        let (mut node, reason) = match compiled {
            Ok(node) => (Some(node), None),
            Err(why) => (None, Some(why.0)),
        };
        let mut output = new_output(&schema, node.as_ref())?;
        let mut positions = BTreeMap::new();
        let started = Instant::now();
        let label = ViewLabel {
            view: name.to_owned(),
        };
        let temporal = node.as_ref().is_some_and(plan::Node::has_temporal);
        match node.as_mut() {
            Some(node) => {
                if temporal {
                    let now = host.views().options.clock.now() * 1000;
                    node.apply(temporal::CLOCK, &temporal::clock_delta(now))
                        .map_err(|e| QueryError::Internal(e.to_string()))?;
                }
                let mut sources = Vec::new();
                node.sources(&mut sources);
                let mut rows = 0u64;
                let mut last_log = Instant::now();
                for src in &sources {
                    let mut feed = |batch: RecordBatch| -> datafusion::common::Result<()> {
                        rows += batch.num_rows() as u64;
                        host.metrics()
                            .view_backfill_rows_total
                            .get_or_create(&label)
                            .inc_by(batch.num_rows() as u64);
                        if let Some(out) = node.apply(src, &ZBatch::inserts(batch))? {
                            output.apply(&out, false)?;
                        }
                        if last_log.elapsed() >= Duration::from_secs(5) {
                            info!(view = name, rows, "backfilling view");
                            last_log = Instant::now();
                        }
                        Ok(())
                    };
                    if host.stream_schema(src).is_some() {
                        let position = host
                            .query_runtime()
                            .block_on(scan_stream(host, src, &mut feed))?;
                        positions.insert(src.clone(), position);
                    } else if let Some(parent) = self.views.iter().find(|v| v.name() == src) {
                        let (_, rows) = parent.shared.snapshot()?;
                        feed(rows)?;
                    }
                }
                // Once over no rows, so an aggregate without GROUP BY has its one row
                // even over empty sources.
                if let Some(src) = sources.first() {
                    let empty = match host.stream_schema(src) {
                        Some(s) => crate::query::query_schema(s.stored_schema()),
                        None => self
                            .views
                            .iter()
                            .find(|v| v.name() == src)
                            .map(|v| v.shared.schema())
                            .ok_or_else(|| QueryError::Internal(format!("{src} vanished")))?,
                    };
                    if let Some(out) = node.apply(src, &ZBatch::empty(empty))? {
                        output.apply(&out, false)?;
                    }
                }
                info!(
                    view = name,
                    rows,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "view filled from existing data; maintained incrementally from here"
                );
            }
            None => {
                let batch = run_query(host, sql)?;
                let batch = crate::query::cast_batch(&batch, &schema)
                    .map_err(|e| QueryError::Internal(e.to_string()))?;
                output.replace(&output.snapshot()?, &batch)?;
                info!(
                    view = name,
                    reason = reason.as_deref().unwrap_or(""),
                    "view is recomputed on an interval"
                );
            }
        }
        let incremental = node.is_some();
        let shared = ViewShared::new(host, name, sql, incremental, reason, reads, output, node, 1);
        let interval = host.views().options.recompute_interval;
        let run = Running {
            shared,
            incremental,
            cost_ns: 0.0,
            positions,
            next_recompute: Instant::now() + interval,
            temporal,
            in_chain: false,
        };
        update_gauges(host, &run);
        Ok(run)
    }

    pub(super) fn create(
        &mut self,
        name: &str,
        sql: &str,
        if_not_exists: bool,
        save: bool,
    ) -> Result<ViewInfo, QueryError> {
        let host = self.host().ok_or_else(gone)?;
        if !crate::schema::is_valid_identifier(name) {
            return Err(QueryError::Invalid(format!(
                "'{name}' is not a valid view name: use lower-case letters, digits and _, \
                 starting with a letter"
            )));
        }
        if host.stream_schema(name).is_some() {
            return Err(QueryError::Conflict(format!("'{name}' is a stream")));
        }
        if let Some(v) = self.views.iter().find(|v| v.name() == name) {
            if if_not_exists {
                return Ok(host.views().info_of(&v.shared));
            }
            return Err(QueryError::Conflict(format!(
                "materialized view '{name}' already exists"
            )));
        }
        let run = self.build(&*host, name, sql)?;
        let info = host.views().info_of(&run.shared);
        host.views()
            .registry
            .write()
            .insert(name.to_owned(), Arc::clone(&run.shared));
        self.views.push(run);
        self.dirty = true;
        if save {
            let saved = SavedView {
                name: name.to_owned(),
                sql: sql.to_owned(),
            };
            self.store_definitions(&*host, |defs| upsert(defs, &saved))?;
        }
        info!(
            view = name,
            maintenance = info.maintenance.as_str(),
            "materialized view created"
        );
        Ok(info)
    }

    pub(super) fn drop_view(&mut self, name: &str, if_exists: bool) -> Result<bool, QueryError> {
        let host = self.host().ok_or_else(gone)?;
        let Some(i) = self.views.iter().position(|v| v.name() == name) else {
            if if_exists {
                return Ok(false);
            }
            return Err(QueryError::NotFound(format!(
                "materialized view '{name}' does not exist"
            )));
        };
        let dependents: Vec<&str> = self
            .views
            .iter()
            .filter(|v| v.shared.reads.iter().any(|r| r == name))
            .map(Running::name)
            .collect();
        if !dependents.is_empty() {
            return Err(QueryError::Conflict(format!(
                "cannot drop materialized view '{name}': {} read{} it; drop {} first",
                dependents.join(", "),
                if dependents.len() == 1 { "s" } else { "" },
                if dependents.len() == 1 { "it" } else { "them" },
            )));
        }
        self.views.remove(i);
        host.views().registry.write().remove(name);
        self.store_definitions(&*host, |defs| defs.retain(|d| d.name != name))?;
        self.dirty = true;
        if let Err(e) = self.checkpoint() {
            warn!(error = %e, "view checkpoint after a drop failed");
        }
        info!(view = name, "materialized view dropped");
        Ok(true)
    }

    pub(super) fn explain(&self, name: &str) -> Result<Vec<String>, QueryError> {
        let run = self
            .views
            .iter()
            .find(|v| v.name() == name)
            .ok_or_else(|| {
                QueryError::NotFound(format!("materialized view '{name}' does not exist"))
            })?;
        let mut lines = vec![format!(
            "MaterializedView: {name} maintenance={} key=[{}] version={}",
            run.shared.maintenance.as_str(),
            run.shared.key.join(", "),
            run.shared.state.read().version
        )];
        match &run.shared.state.read().node {
            Some(node) => node.explain(1, &mut lines),
            None => lines.push(format!(
                "  recomputed every {:?}: {}",
                self.host()
                    .map(|e| e.views().options.recompute_interval)
                    .unwrap_or_default(),
                run.shared.reason.as_deref().unwrap_or("")
            )),
        }
        Ok(lines)
    }

    /// Applies `change` to the catalog's view definitions (see [`crate::catalog`]: a
    /// change made meanwhile by another server on the store is kept, not overwritten).
    pub(super) fn store_definitions(
        &self,
        host: &dyn ViewHost,
        mut change: impl FnMut(&mut Vec<SavedView>),
    ) -> Result<(), QueryError> {
        host.query_runtime()
            .block_on(host.views_document().update(|defs| {
                change(defs);
                Ok(())
            }))
            .map(|_| ())
            .map_err(|e| QueryError::Internal(format!("cannot save view definitions: {e}")))
    }

    /// Loads saved definitions and the checkpoint, then brings every view up.
    pub(super) fn restore(&mut self) {
        let Some(host) = self.host() else { return };
        let started = Instant::now();
        let rt = host.query_runtime();
        let mut defs: Vec<SavedView> = match rt.block_on(host.views_document().read()) {
            Ok(defs) => defs,
            Err(e) => {
                error!(error = %e, "cannot read the view definitions; starting from the configured views");
                Vec::new()
            }
        };
        for stmt in &host.views().options.definitions {
            match crate::query::parse_view_definition(stmt) {
                Ok((name, sql)) => match defs.iter_mut().find(|d| d.name == name) {
                    Some(d) => d.sql = sql,
                    None => defs.push(SavedView { name, sql }),
                },
                Err(e) => error!(error = %e, "a configured view definition is invalid; skipped"),
            }
        }
        let saved = match rt.block_on(read_chain(&*host)) {
            Ok(Some((saved, chain))) => {
                self.chain = chain;
                saved
            }
            Ok(None) => Vec::new(),
            Err(e) => {
                warn!(error = %e, "cannot read the view checkpoint; views are refilled from the tables");
                Vec::new()
            }
        };
        for def in defs {
            let restored = saved
                .iter()
                .find(|s| s.name == def.name && s.sql == def.sql)
                .and_then(|s| match self.load_view(&*host, s) {
                    Ok(run) => Some(run),
                    Err(e) => {
                        warn!(view = %def.name, error = %e, "cannot restore the view from its checkpoint; refilling it");
                        None
                    }
                });
            let result = match restored {
                Some(run) => {
                    host.views()
                        .registry
                        .write()
                        .insert(def.name.clone(), Arc::clone(&run.shared));
                    info!(view = %def.name, version = run.shared.state.read().version, "view restored from its checkpoint");
                    self.views.push(run);
                    Ok(())
                }
                None => self.create(&def.name, &def.sql, false, false).map(|_| ()),
            };
            if let Err(e) = result {
                error!(view = %def.name, error = %e, "view could not be created; skipped");
            }
            // Under the memory limit before the next view loads: the restore holds at
            // most one view's state over it.
            while self.bound_memory(true) {}
        }
        *host.views().floor.write() = Some(self.floor());
        let running: Vec<SavedView> = self
            .views
            .iter()
            .map(|v| SavedView {
                name: v.shared.name.clone(),
                sql: v.shared.sql.clone(),
            })
            .collect();
        if let Err(e) = self.store_definitions(&*host, |defs| {
            for view in &running {
                upsert(defs, view);
            }
        }) {
            warn!(error = %e, "cannot save view definitions");
        }
        info!(
            views = self.views.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "views ready"
        );
    }

    pub(super) fn load_view(
        &self,
        host: &dyn ViewHost,
        saved: &SavedState,
    ) -> Result<Running, QueryError> {
        let plan = host
            .query_runtime()
            .block_on(host.view_planner().plan_view(&saved.sql))?;
        let schema: SchemaRef = Arc::clone(plan.schema().inner());
        let mut node = plan::compile(&plan, &host.view_planner().state(), &|n| {
            self.source_kind(host, n)
        })
        .ok();
        if node.is_some() != saved.incremental {
            return Err(QueryError::Internal(
                "maintenance changed since the checkpoint".into(),
            ));
        }
        let mut output = new_output(&schema, node.as_ref())?;
        // The full state, then each delta on it, in the order they were written.
        for (delta, body) in &saved.bodies {
            let mut r = Reader::new(body);
            if let Some(node) = node.as_mut() {
                node.load(&mut r, *delta)?;
            }
            output.load(&mut r, *delta)?;
            if !r.is_done() {
                return Err(QueryError::Internal(
                    "the checkpoint has trailing bytes".into(),
                ));
            }
        }
        if let Some(node) = node.as_mut() {
            node.after_restore()?;
        }
        // Rows the checkpoint does not hold are listed again from the operators' state
        // (only counted, where the view does not hold them either).
        if let Some(node) = node.as_ref() {
            match output.mode() {
                Rows::Saved => {}
                Rows::Rebuilt => node.emit_all(REBUILD_CHUNK, &mut |rows| {
                    output.apply(&rows, false).map(|_| ())
                })?,
                Rows::Derived => node.emit_all(REBUILD_CHUNK, &mut |rows| {
                    output.restored(rows.batch.num_rows());
                    Ok(())
                })?,
            }
        }
        let mut reads = Vec::new();
        collect_tables(&plan, &mut reads);
        let reason = match &node {
            Some(_) => None,
            None => plan::compile(&plan, &host.view_planner().state(), &|n| {
                self.source_kind(host, n)
            })
            .err()
            .map(|why| why.0),
        };
        let incremental = node.is_some();
        let node_has_temporal = node.as_ref().is_some_and(plan::Node::has_temporal);
        let shared = ViewShared::new(
            host,
            &saved.name,
            &saved.sql,
            incremental,
            reason,
            reads,
            output,
            node,
            saved.version,
        );
        let run = Running {
            shared,
            incremental,
            cost_ns: 0.0,
            positions: saved.positions.clone(),
            next_recompute: Instant::now(),
            temporal: node_has_temporal,
            in_chain: true,
        };
        update_gauges(host, &run);
        Ok(run)
    }

    /// Per stream, the lowest WAL position any view has applied.
    pub(super) fn floor(&self) -> HashMap<String, u64> {
        let mut floor: HashMap<String, u64> = HashMap::new();
        for run in &self.views {
            for (s, p) in &run.positions {
                let e = floor.entry(s.clone()).or_insert(*p);
                *e = (*e).min(*p);
            }
        }
        floor
    }
}

/// Moves a view forward: runs its operators over the changes of the sources it reads
/// (`deltas`, by source) and applies what they output to its rows. Operators, rows and
/// version change under one lock, so a snapshot is never ahead of its version (and
/// rows derived from the operators match the rows held). Then records and broadcasts
/// the change set; returns the change for views that read this one.
pub(super) fn advance(
    host: &dyn ViewHost,
    run: &Running,
    deltas: &[(String, ZBatch)],
    acked: Option<Instant>,
) -> datafusion::common::Result<Option<ZBatch>> {
    let read_by_others = host
        .views()
        .registry
        .read()
        .values()
        .any(|v| v.reads.contains(&run.shared.name));
    let (version, applied) = {
        let mut state = run.shared.state.write();
        let state = &mut *state;
        let Some(node) = state.node.as_mut() else {
            return Ok(None);
        };
        let mut outs = Vec::new();
        for (src, delta) in deltas {
            outs.extend(node.apply(src, delta)?.filter(|out| !out.is_empty()));
        }
        if outs.is_empty() {
            return Ok(None);
        }
        let diff = ZBatch::concat(&outs[0].batch.schema(), &outs)?;
        let applied = state.output.apply(&diff, read_by_others)?;
        (state.bump(&applied), applied)
    };
    if applied.is_empty() {
        return Ok(None);
    }
    Ok(Some(finish(host, run, applied, version, acked)))
}

/// Versions and sends out an applied change.
pub(super) fn finish(
    host: &dyn ViewHost,
    run: &Running,
    applied: output::Applied,
    version: u64,
    acked: Option<Instant>,
) -> ZBatch {
    let change = Arc::new(ChangeSet {
        view: run.shared.name.clone(),
        version,
        upserts: applied.upserts,
        deletes: applied.deletes,
        replaced: applied.replaced,
        acked_at: acked,
    });
    let label = ViewLabel {
        view: run.shared.name.clone(),
    };
    let m = host.metrics();
    m.view_changes_total.get_or_create(&label).inc();
    if let Some(t) = acked {
        m.view_freshness_seconds.observe(t.elapsed().as_secs_f64());
    }
    {
        let mut history = run.shared.history.lock();
        history.push_back(Arc::clone(&change));
        while history.len() > host.views().options.history.max(1) {
            history.pop_front();
        }
    }
    let changes = &host.views().changes;
    let _ = changes.send(change);
    m.view_changes_queued.set(changes.len() as i64);
    applied.diff
}

/// Sets a view's row and state gauges; returns the bytes of its state in memory.
pub(super) fn update_gauges(host: &dyn ViewHost, run: &Running) -> usize {
    let state = run.shared.state.read();
    let bytes = state.output.state_bytes() + state.node.as_ref().map_or(0, Node::state_bytes);
    let disk = state.node.as_ref().map_or(0, Node::disk_bytes);
    run.shared.state_bytes.store(bytes, Ordering::Relaxed);
    run.shared.disk_bytes.store(disk, Ordering::Relaxed);
    let label = ViewLabel {
        view: run.shared.name.clone(),
    };
    let m = host.metrics();
    m.view_rows
        .get_or_create(&label)
        .set(state.output.len() as i64);
    for (tier, bytes) in [("memory", bytes), ("disk", disk)] {
        m.view_state_bytes
            .get_or_create(&ViewStateLabel {
                view: run.shared.name.clone(),
                tier: tier.to_owned(),
            })
            .set(bytes as i64);
    }
    bytes
}

/// A view's (empty) rows. When its operators can list them from their own state,
/// checkpoints do not hold them, and with a key neither does the view: a `DISTINCT ON`
/// view's rows would otherwise be held twice, in the operator and in the view.
pub(super) fn new_output(
    schema: &SchemaRef,
    node: Option<&plan::Node>,
) -> Result<Output, QueryError> {
    let key = node.and_then(|n| n.key.clone());
    let mode = match node {
        Some(n) if n.can_emit_all() && key.is_some() => Rows::Derived,
        Some(n) if n.can_emit_all() => Rows::Rebuilt,
        _ => Rows::Saved,
    };
    Ok(Output::new(Arc::clone(schema), key, mode)?)
}

/// Every table a plan reads.
pub(super) fn collect_tables(plan: &datafusion::logical_expr::LogicalPlan, out: &mut Vec<String>) {
    let _ = plan.apply_with_subqueries(|p| {
        if let datafusion::logical_expr::LogicalPlan::TableScan(s) = p {
            let name = s.table_name.table().to_owned();
            if !out.contains(&name) {
                out.push(name);
            }
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
}

/// Reads a stream as it is now, batch by batch; returns the WAL position read up to.
pub(super) async fn scan_stream(
    host: &dyn ViewHost,
    stream: &str,
    feed: &mut dyn FnMut(RecordBatch) -> datafusion::common::Result<()>,
) -> Result<u64, QueryError> {
    let (provider, position) = host
        .stream_provider_at_position(stream)
        .ok_or_else(|| QueryError::Invalid(format!("stream '{stream}' does not exist")))??;
    let session = host.view_planner();
    let mut batches = session.scan(provider).await?;
    while let Some(batch) = batches.next().await {
        feed(batch?)?;
    }
    Ok(position)
}

/// Runs a view's SQL as a query; one batch of all rows.
pub(super) fn run_query(host: &dyn ViewHost, sql: &str) -> datafusion::common::Result<RecordBatch> {
    let session = host.query_session();
    let sql = sql.to_owned();
    host.query_runtime().block_on(async move {
        let plan = match session.prepare(&sql, &[]).await {
            Ok(crate::query::Prepared::Query(p)) => *p,
            Ok(_) => return Err(DataFusionError::Plan("a view must be a query".into())),
            Err(e) => return Err(DataFusionError::Plan(e.to_string())),
        };
        let schema: SchemaRef = Arc::clone(plan.schema().inner());
        let mut stream = session
            .execute(plan)
            .await
            .map_err(|e| DataFusionError::Execution(e.to_string()))?;
        let mut parts = Vec::new();
        while let Some(b) = stream.next().await {
            parts.push(b?);
        }
        let schema = parts.first().map_or(schema, |b| b.schema());
        Ok(arrow::compute::concat_batches(&schema, &parts)?)
    })
}
