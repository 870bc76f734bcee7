//! Arrow Flight SQL: Arrow-native clients (ADBC, the Flight SQL JDBC driver) query
//! Quiver and get results as Arrow batches, with no row encoding in between.
//!
//! Every call carries `authorization: Bearer <token>`; a client that speaks basic auth
//! (user name free, password = token) gets the token back as its bearer from the
//! handshake. Statements go through the same checks, DDL rights, slots, timeout and
//! result limit as `POST /v1/sql`.
//!
//! A statement's ticket is its SQL text: `DoGet` plans it again under the caller's
//! token, so a ticket grants nothing its holder could not run. Prepared statements live
//! on the server, keyed by a random handle and bound to the token that made them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{
    GetCatalogsBuilder, GetDbSchemasBuilder, GetTablesBuilder, SqlInfoData, SqlInfoDataBuilder,
};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt,
    SqlInfo, SqlSupportedTransaction, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use base64::Engine as _;
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use futures::{Stream, TryStreamExt};
use parking_lot::Mutex;
use prost::Message;
use quiver_engine::{Engine, Prepared, QueryError, QuiverDdl};
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::service::{DdlOutcome, execute_ddl, spawn_batches, take_slot};
use crate::state::AppState;

/// Binds the Flight SQL listener and serves it until `shutdown` changes.
pub(crate) async fn start(
    state: Arc<AppState>,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the Flight SQL listener on {addr}"))?;
    let bound = listener.local_addr()?;
    let service =
        FlightServiceServer::new(QuiverFlight::new(state)).max_decoding_message_size(64 << 20);
    info!(flight_addr = %bound, tls = tls.is_some(), "Arrow Flight SQL listening");
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.changed().await;
        };
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service);
        let served = match tls {
            None => {
                router
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        stop,
                    )
                    .await
            }
            Some(acceptor) => {
                router
                    .serve_with_incoming_shutdown(
                        crate::tls::flight_incoming(listener, acceptor),
                        stop,
                    )
                    .await
            }
        };
        if let Err(e) = served {
            warn!(error = %e, "Flight SQL server failed");
        }
    });
    Ok((bound, task))
}

/// Prepared statements a connection-less protocol keeps on the server.
const MAX_PREPARED_PER_TOKEN: usize = 1_000;
/// A prepared statement unused this long is dropped.
const PREPARED_IDLE: Duration = Duration::from_secs(3600);

struct PreparedStatement {
    token_id: String,
    sql: String,
    params: Vec<ScalarValue>,
    used: Instant,
}

/// The Flight SQL service.
pub(crate) struct QuiverFlight {
    state: Arc<AppState>,
    sql_info: SqlInfoData,
    prepared: Mutex<HashMap<Vec<u8>, PreparedStatement>>,
}

impl QuiverFlight {
    fn new(state: Arc<AppState>) -> Self {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "Quiver");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(
            SqlInfo::FlightSqlServerTransaction,
            SqlSupportedTransaction::None as i32,
        );
        info.append(SqlInfo::FlightSqlServerCancel, false);
        info.append(SqlInfo::SqlDdlCatalog, false);
        info.append(SqlInfo::SqlDdlSchema, false);
        info.append(SqlInfo::SqlDdlTable, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        info.append(SqlInfo::SqlSchemaTerm, "schema");
        info.append(SqlInfo::SqlCatalogTerm, "catalog");
        info.append(SqlInfo::SqlTransactionsSupported, false);
        let sql_info = info.build().expect("static SqlInfo values are well-formed");
        Self {
            state,
            sql_info,
            prepared: Mutex::new(HashMap::new()),
        }
    }

    fn engine(&self) -> Result<&Engine, Status> {
        self.state
            .engine
            .get()
            .ok_or_else(|| Status::unavailable("the server is recovering its write-ahead log"))
    }

    /// The caller, from `authorization: Bearer <token>` (or basic auth, password = token).
    fn principal<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let value = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing 'authorization' metadata: send 'Bearer <token>', or basic auth \
                     with the token as password",
                )
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization metadata is not text"))?;
        let token = bearer_or_basic(value)?;
        let principal = self
            .state
            .tokens
            .check(&token)
            .map_err(Status::unauthenticated)?;
        if !principal.has(Scope::Read) {
            return Err(Status::permission_denied(
                "this token lacks the 'read' scope needed to query",
            ));
        }
        Ok(principal)
    }

    /// Plans `sql` (bound with `params`) under `principal` and streams its result; DDL
    /// runs here and answers with one row saying what it did.
    async fn run(
        &self,
        principal: &Principal,
        sql: &str,
        params: &[ScalarValue],
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let engine = self.engine()?;
        let timeout = engine.query_options().timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let slot = take_slot(&self.state).await.map_err(status)?;
        let session = engine.query_session();
        let planned = tokio::time::timeout_at(deadline, session.prepare_holding(sql, params, slot))
            .await
            .unwrap_or(Err(QueryError::Timeout(timeout)))
            .map_err(|e| status(ApiError::from(e)))?;
        let (plan, slot) = match planned {
            (Prepared::Query(plan), slot) => (*plan, slot),
            (Prepared::Ddl(ddl), _) => {
                let batch = ddl_batch(engine, &self.state.reports, principal, ddl).await?;
                return Ok(batches_response(
                    batch.schema(),
                    futures::stream::iter([Ok(batch)]),
                ));
            }
        };
        let schema = Arc::clone(plan.schema().inner());
        let batches = spawn_batches(
            engine,
            session,
            plan,
            deadline,
            slot,
            self.state.config.max_result_bytes,
        );
        let batches = batches.map_err(|e| FlightError::Tonic(Box::new(status(ApiError::from(e)))));
        Ok(batches_response(schema, batches))
    }

    /// The schema `sql` answers with, from its plan (placeholders unbound), and how
    /// many parameters it takes with their types.
    async fn describe(&self, sql: &str) -> Result<(SchemaRef, Option<Schema>), Status> {
        let engine = self.engine()?;
        let session = engine.query_session();
        match session
            .prepare_unbound(sql)
            .await
            .map_err(|e| status(ApiError::from(e)))?
        {
            Prepared::Query(plan) => {
                let types = plan.get_parameter_types().map_err(|e| {
                    Status::invalid_argument(format!("parameter types: {}", e.strip_backtrace()))
                })?;
                let params = (!types.is_empty()).then(|| {
                    Schema::new(
                        (1..=types.len())
                            .map(|i| {
                                let name = format!("${i}");
                                let ty = types.get(&name).cloned().flatten();
                                Field::new(name, ty.unwrap_or(DataType::Utf8), true)
                            })
                            .collect::<Vec<_>>(),
                    )
                });
                Ok((Arc::clone(plan.schema().inner()), params))
            }
            Prepared::Ddl(ddl) => Ok((ddl_schema(&ddl), None)),
        }
    }

    fn info(
        &self,
        schema: &Schema,
        ticket: Vec<u8>,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("encoding the schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    /// The answer to a catalog call's GetFlightInfo: its result schema, and a ticket
    /// that is the command itself, for a caller with the read scope.
    fn catalog_info(
        &self,
        schema: &Schema,
        command: Any,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        self.info(schema, command.encode_to_vec(), request.into_inner())
    }
}

/// The token in `Bearer <token>` or `Basic base64(user:token)`.
fn bearer_or_basic(value: &str) -> Result<String, Status> {
    if let Some(token) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    {
        return Ok(token.trim().to_owned());
    }
    if let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    {
        // Clients differ on padding (Go's Flight client sends none).
        let encoded = encoded.trim().trim_end_matches('=');
        let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(encoded)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded))
            .map_err(|_| Status::unauthenticated("basic auth is not valid base64"))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| Status::unauthenticated("basic auth is not UTF-8"))?;
        let (_, password) = text
            .split_once(':')
            .ok_or_else(|| Status::unauthenticated("basic auth must be user:password"))?;
        return Ok(password.to_owned());
    }
    Err(Status::unauthenticated(
        "authorization must be 'Bearer <token>' or basic auth with the token as password",
    ))
}

/// A Quiver error as a gRPC status with the same message, its code from the kind.
fn status(e: ApiError) -> Status {
    Status::new(e.kind.grpc_code(), format!("{} ({})", e.message, e.code))
}

/// What a DDL statement answers with: its plan lines, or one row of JSON.
fn ddl_schema(ddl: &QuiverDdl) -> SchemaRef {
    let name = match ddl {
        QuiverDdl::ExplainMaterializedView { .. } => "plan",
        _ => "result",
    };
    Arc::new(Schema::new(vec![Field::new(name, DataType::Utf8, false)]))
}

async fn ddl_batch(
    engine: &Engine,
    reports: &crate::reports::Reports,
    principal: &Principal,
    ddl: QuiverDdl,
) -> Result<RecordBatch, Status> {
    let schema = ddl_schema(&ddl);
    let lines = match execute_ddl(engine, reports, principal, ddl)
        .await
        .map_err(status)?
    {
        DdlOutcome::Done { body, .. } => vec![body.to_string()],
        DdlOutcome::Plan(lines) => lines,
    };
    RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(lines)) as ArrayRef])
        .map_err(|e| Status::internal(e.to_string()))
}

fn batches_response<S>(
    schema: SchemaRef,
    batches: S,
) -> Response<<QuiverFlight as FlightService>::DoGetStream>
where
    S: Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
{
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(batches)
        .map_err(|e| match e {
            FlightError::Tonic(status) => *status,
            other => Status::internal(other.to_string()),
        });
    Response::new(Box::pin(stream))
}

fn one_batch(
    batch: Result<RecordBatch, FlightError>,
) -> Result<Response<<QuiverFlight as FlightService>::DoGetStream>, Status> {
    let batch = batch.map_err(|e| Status::internal(format!("building the answer: {e}")))?;
    Ok(batches_response(
        batch.schema(),
        futures::stream::iter([Ok(batch)]),
    ))
}

/// The first row of a parameter batch as values for `$1 … $n`.
fn row_values(batch: &RecordBatch) -> Result<Vec<ScalarValue>, Status> {
    if batch.num_rows() != 1 {
        return Err(Status::invalid_argument(format!(
            "bind one row of parameters; got {}",
            batch.num_rows()
        )));
    }
    batch
        .columns()
        .iter()
        .map(|col| {
            ScalarValue::try_from_array(col, 0)
                .map_err(|e| Status::invalid_argument(format!("parameter value: {e}")))
        })
        .collect()
}

/// Every table and view of the `quiver` catalog, with its type and schema.
async fn tables(engine: &Engine) -> Result<Vec<(String, TableType, SchemaRef)>, Status> {
    let session = engine.query_session();
    let schema = session
        .context()
        .catalog(quiver_engine::query::CATALOG)
        .and_then(|c| c.schema(quiver_engine::query::SCHEMA))
        .ok_or_else(|| Status::internal("the quiver catalog is missing"))?;
    let mut out = Vec::new();
    let mut names = schema.table_names();
    names.sort();
    for name in names {
        if let Ok(Some(provider)) = schema.table(&name).await {
            out.push((name, provider.table_type(), provider.schema()));
        }
    }
    Ok(out)
}

fn table_type_name(t: TableType) -> &'static str {
    match t {
        TableType::View => "VIEW",
        _ => "TABLE",
    }
}

#[tonic::async_trait]
impl FlightSqlService for QuiverFlight {
    type FlightService = QuiverFlight;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let value = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("missing 'authorization' metadata"))?;
        let token = bearer_or_basic(value)?;
        self.principal(&request)?;
        let output = futures::stream::iter([Ok(HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        })]);
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(output));
        let bearer = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Status::unauthenticated("the token is not valid metadata"))?;
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.principal(&request)?;
        let (schema, _) = self.describe(&query.query).await?;
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        self.info(
            &schema,
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let principal = self.principal(&request)?;
        let sql = String::from_utf8(ticket.statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("the ticket is not a statement"))?;
        self.run(&principal, &sql, &[]).await
    }

    async fn do_put_statement_update(
        &self,
        query: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let principal = self.principal(&request)?;
        let engine = self.engine()?;
        let session = engine.query_session();
        match session
            .prepare(&query.query, &[])
            .await
            .map_err(|e| status(ApiError::from(e)))?
        {
            Prepared::Ddl(ddl) => {
                execute_ddl(engine, &self.state.reports, &principal, ddl)
                    .await
                    .map_err(status)?;
                Ok(0)
            }
            Prepared::Query(_) => Err(Status::invalid_argument(
                "this is a query: run it with a statement query (execute), not an update; \
                 Quiver takes no INSERT, UPDATE or DELETE",
            )),
        }
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let principal = self.principal(&request)?;
        let (schema, params) = self.describe(&query.query).await?;
        let encode = |schema: &Schema| -> Result<bytes::Bytes, Status> {
            let IpcMessage(bytes) = SchemaAsIpc::new(schema, &Default::default())
                .try_into()
                .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
            Ok(bytes)
        };
        let handle: [u8; 16] = rand::random();
        let mut prepared = self.prepared.lock();
        prepared.retain(|_, p| p.used.elapsed() < PREPARED_IDLE);
        let held = prepared
            .values()
            .filter(|p| p.token_id == principal.token_id)
            .count();
        if held >= MAX_PREPARED_PER_TOKEN {
            return Err(Status::resource_exhausted(format!(
                "this token holds {held} prepared statements; close some first"
            )));
        }
        prepared.insert(
            handle.to_vec(),
            PreparedStatement {
                token_id: principal.token_id.clone(),
                sql: query.query,
                params: Vec::new(),
                used: Instant::now(),
            },
        );
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.to_vec().into(),
            dataset_schema: encode(&schema)?,
            parameter_schema: match params {
                Some(p) => encode(&p)?,
                None => Default::default(),
            },
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let principal = self.principal(&request)?;
        let mut prepared = self.prepared.lock();
        let key = query.prepared_statement_handle.to_vec();
        if prepared
            .get(&key)
            .is_some_and(|p| p.token_id == principal.token_id)
        {
            prepared.remove(&key);
        }
        Ok(())
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let principal = self.principal(&request)?;
        let stream = request.into_inner().map_err(FlightError::from);
        let batches: Vec<RecordBatch> =
            arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(stream)
                .try_collect()
                .await
                .map_err(|e| Status::invalid_argument(format!("reading the parameters: {e}")))?;
        let params = match batches.iter().find(|b| b.num_rows() > 0) {
            Some(batch) => row_values(batch)?,
            None => Vec::new(),
        };
        let key = query.prepared_statement_handle.to_vec();
        let mut prepared = self.prepared.lock();
        let entry = prepared
            .get_mut(&key)
            .filter(|p| p.token_id == principal.token_id)
            .ok_or_else(|| Status::not_found("no such prepared statement"))?;
        entry.params = params;
        entry.used = Instant::now();
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let principal = self.principal(&request)?;
        let sql = {
            let prepared = self.prepared.lock();
            prepared
                .get(query.prepared_statement_handle.as_ref())
                .filter(|p| p.token_id == principal.token_id)
                .map(|p| p.sql.clone())
                .ok_or_else(|| Status::not_found("no such prepared statement"))?
        };
        let (schema, _) = self.describe(&sql).await?;
        self.info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let principal = self.principal(&request)?;
        let (sql, params) = {
            let mut prepared = self.prepared.lock();
            let p = prepared
                .get_mut(query.prepared_statement_handle.as_ref())
                .filter(|p| p.token_id == principal.token_id)
                .ok_or_else(|| Status::not_found("no such prepared statement"))?;
            p.used = Instant::now();
            (p.sql.clone(), p.params.clone())
        };
        self.run(&principal, &sql, &params).await
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.catalog_info(&schema, query.as_any(), request)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        let mut builder: GetCatalogsBuilder = query.into_builder();
        builder.append(quiver_engine::query::CATALOG);
        one_batch(builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.catalog_info(&schema, query.as_any(), request)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        let mut builder: GetDbSchemasBuilder = query.into_builder();
        builder.append(quiver_engine::query::CATALOG, quiver_engine::query::SCHEMA);
        one_batch(builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.catalog_info(&schema, query.as_any(), request)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        let engine = self.engine()?;
        let mut builder: GetTablesBuilder = query.into_builder();
        for (name, kind, schema) in tables(engine).await? {
            builder
                .append(
                    quiver_engine::query::CATALOG,
                    quiver_engine::query::SCHEMA,
                    name,
                    table_type_name(kind),
                    &schema,
                )
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.catalog_info(&schema, query.as_any(), request)
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        builder.append("VIEW");
        one_batch(builder.build())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.sql_info).schema();
        self.catalog_info(&schema, query.as_any(), request)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        one_batch(query.into_builder(&self.sql_info).build())
    }

    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.principal(&request)?;
        Err(Status::unimplemented(format!(
            "Quiver does not serve {} tickets",
            message.type_url
        )))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
