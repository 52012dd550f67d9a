/*
 * bench/c/ceiling.c -- PROTOTYPE for bench/ceiling.py, not part of the product.
 *
 * What a conflict engine written in C could cost the apply worker on the path that carries no
 * conflict, and the one piece of information such an engine needs that SQL cannot read:
 *
 *   ceiling_noop_trigger()      a BEFORE row trigger that returns the row (the price of any trigger)
 *   ceiling_fast_trigger()      the checks a commit-timestamp engine makes per applied change:
 *                               INSERT  -> probe the replica-identity index for the key
 *                               UPDATE/DELETE -> the old row's last writer (origin of its xmin's
 *                               commit timestamp) is the node this change comes from
 *                               anything else is a conflict candidate ("slow path", logged here)
 *   ceiling_remote_commit_ts()  the remote transaction's commit time, which the apply worker sets
 *                               (replorigin_session_origin_timestamp) just before it commits: NULL in
 *                               row triggers, the exact remote commit time in deferred triggers
 *
 * Built by bench/ceiling.py against the server headers of the PostgreSQL it measures (PG 18 wheel).
 */
#include "postgres.h"

#include "access/commit_ts.h"
#include "access/genam.h"
#include "access/htup_details.h"
#include "access/relscan.h"
#include "access/stratnum.h"
#include "access/tableam.h"
#include "commands/trigger.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "replication/origin.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(ceiling_noop_trigger);
PG_FUNCTION_INFO_V1(ceiling_fast_trigger);
PG_FUNCTION_INFO_V1(ceiling_remote_commit_ts);

static long slow_paths = 0;

static Datum
trigger_result(TriggerData *td)
{
	if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
		return PointerGetDatum(td->tg_newtuple);
	return PointerGetDatum(td->tg_trigtuple);
}

Datum
ceiling_noop_trigger(PG_FUNCTION_ARGS)
{
	return trigger_result((TriggerData *) fcinfo->context);
}

/*
 * What the key probe needs of a table, looked up once per table and backend (a prototype: no
 * invalidation, so a table whose key changes needs a new session).
 */
typedef struct ProbeInfo
{
	Oid			relid;
	Oid			idxoid;
	int			nkeys;
	AttrNumber	attno[INDEX_MAX_KEYS];
	Oid			optype[INDEX_MAX_KEYS];
	Oid			collation[INDEX_MAX_KEYS];
	RegProcedure eqproc[INDEX_MAX_KEYS];
} ProbeInfo;

#define PROBE_CACHE 16
static ProbeInfo probe_cache[PROBE_CACHE];
static int	probe_cached = 0;

static ProbeInfo *
probe_info(Relation rel)
{
	Oid			relid = RelationGetRelid(rel);
	ProbeInfo  *info;
	Relation	idx;
	int			i;

	for (i = 0; i < probe_cached; i++)
		if (probe_cache[i].relid == relid)
			return &probe_cache[i];
	info = &probe_cache[probe_cached < PROBE_CACHE ? probe_cached++ : PROBE_CACHE - 1];
	info->relid = relid;
	info->idxoid = RelationGetReplicaIndex(rel);
	info->nkeys = 0;
	if (!OidIsValid(info->idxoid))
		return info;
	idx = index_open(info->idxoid, AccessShareLock);
	info->nkeys = IndexRelationGetNumberOfKeyAttributes(idx);
	for (i = 0; i < info->nkeys; i++)
	{
		Oid			optype = idx->rd_opcintype[i];

		info->attno[i] = idx->rd_index->indkey.values[i];
		info->optype[i] = optype;
		info->collation[i] = idx->rd_indcollation[i];
		info->eqproc[i] = get_opcode(get_opfamily_member(idx->rd_opfamily[i], optype, optype,
														 BTEqualStrategyNumber));
	}
	index_close(idx, AccessShareLock);
	return info;
}

/* Does a row with tup's replica-identity key exist (dirty snapshot: committed or in progress)? */
static bool
key_exists(Relation rel, HeapTuple tup)
{
	ProbeInfo  *info = probe_info(rel);
	Relation	idx;
	int			i;
	ScanKeyData skey[INDEX_MAX_KEYS];
	SnapshotData snap;
	IndexScanDesc scan;
	TupleTableSlot *slot;
	bool		found;

	if (info->nkeys == 0)
		return false;
	idx = index_open(info->idxoid, RowExclusiveLock);
	for (i = 0; i < info->nkeys; i++)
	{
		bool		isnull;
		Datum		value;

		/*
		 * heap_getattr() without its newer minors' heap_datum_check() call (17.12 inlines a call to
		 * it; a library built with those headers does not load into an older 17 server)
		 */
		if (info->attno[i] > (int) HeapTupleHeaderGetNatts(tup->t_data))
			value = getmissingattr(RelationGetDescr(rel), info->attno[i], &isnull);
		else
			value = fastgetattr(tup, info->attno[i], RelationGetDescr(rel), &isnull);

		ScanKeyEntryInitialize(&skey[i], isnull ? SK_ISNULL | SK_SEARCHNULL : 0, i + 1,
							   BTEqualStrategyNumber, info->optype[i], info->collation[i],
							   info->eqproc[i], value);
	}
	InitDirtySnapshot(snap);
#if PG_VERSION_NUM >= 180000
	scan = index_beginscan(rel, idx, &snap, NULL, info->nkeys, 0);
#else
	scan = index_beginscan(rel, idx, &snap, info->nkeys, 0);
#endif
	index_rescan(scan, skey, info->nkeys, NULL, 0);
	slot = table_slot_create(rel, NULL);
	found = index_getnext_slot(scan, ForwardScanDirection, slot);
	ExecDropSingleTupleTableSlot(slot);
	index_endscan(scan);
	index_close(idx, NoLock);
	return found;
}

Datum
ceiling_fast_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	bool		candidate;

	if (TRIGGER_FIRED_BY_INSERT(td->tg_event))
		candidate = key_exists(td->tg_relation, td->tg_trigtuple);
	else
	{
		TransactionId xmin = HeapTupleHeaderGetXmin(td->tg_trigtuple->t_data);
		TimestampTz ts;
		RepOriginId writer = InvalidRepOriginId;

		candidate = !TransactionIdGetCommitTsData(xmin, &ts, &writer) ||
			writer != replorigin_session_origin;
	}
	if (candidate && slow_paths++ < 5)
		elog(LOG, "ceiling: slow path (conflict candidate)");
	return trigger_result(td);
}

Datum
ceiling_remote_commit_ts(PG_FUNCTION_ARGS)
{
	if (replorigin_session_origin == InvalidRepOriginId || replorigin_session_origin_timestamp == 0)
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(replorigin_session_origin_timestamp);
}
