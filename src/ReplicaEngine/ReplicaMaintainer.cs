using Microsoft.Extensions.Logging;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The background life of one replica: whenever it is out of service, reconnect (with backoff) and
/// live-repair it. A worker, not an owner: every state change it makes is a request to the loop.
/// </summary>
internal sealed class ReplicaMaintainer(Engine engine, IDownstairsConnector connector, Replica replica, ReplicatedVolume volume)
{
    private static readonly TimeSpan ProgressLogInterval = TimeSpan.FromSeconds(2);
    private static readonly TimeSpan GuestIdleAfter = TimeSpan.FromMilliseconds(100);

    private readonly EngineOptions _options = engine.Options;
    private readonly int _index = replica.Index;

    public async Task RunAsync(CancellationToken stopping)
    {
        SemaphoreSlim wake = engine.Reconnect[_index];
        while (!stopping.IsCancellationRequested)
        {
            try
            {
                await wake.WaitAsync(stopping);
                (bool connected, TimeSpan backoff) = await engine.InvokeAsync(() => (replica.Connection is not null, replica.ReconnectDelay));
                if (connected)
                {
                    // A stale wake-up: the fault that signalled it was already answered by a
                    // reconnect. Connecting again would fence the healthy connection.
                    continue;
                }
                if (backoff > TimeSpan.Zero)
                {
                    await Task.Delay(backoff, engine.Time, stopping);
                }
            }
            catch (OperationCanceledException)
            {
                return;
            }
            await ReconnectAsync(stopping);
        }
    }

    private async Task ReconnectAsync(CancellationToken stopping)
    {
        TimeSpan delay = _options.ReconnectInitialDelay;
        while (!stopping.IsCancellationRequested)
        {
            var connection = new ReplicaConnection(engine, _index);
            bool attached = false;
            try
            {
                connection.Client = await connector.ConnectAsync(_index, volume.Hello(replica.RegionId), connection, stopping);
                HelloReply r = connection.Region;
                r.Validate();
                if (r.BlockSize != engine.BlockSize || r.ExtentBlocks != engine.ExtentBlocks || r.ExtentCount != engine.ExtentCount)
                {
                    throw new InvalidOperationException($"region has a different shape ({r.ExtentCount} extents of {r.ExtentBlocks} × {r.BlockSize} bytes)");
                }
                bool flapping = await engine.InvokeAsync(() =>
                {
                    if (replica.RegionId == Guid.Empty)
                    {
                        replica.RegionId = r.RegionId;
                    }
                    return replica.ReconnectDelay > TimeSpan.Zero;
                });
                if (flapping)
                {
                    // Flapping: one line per interval, not one per cycle.
                    engine.Throttle.Report(LogLevel.Information, $"Replica {_index} ({replica.EndPoint}) reconnected", () => "live repair starts again");
                }
                else
                {
                    EngineLog.Connected(engine.Logger, _index, replica.EndPoint.ToString(), r.RegionId, r.ExtentCount, (long)r.ExtentBlocks * r.BlockSize, r.BlockSize);
                }
                attached = true;
                await LiveRepairAsync(connection, stopping);
                return;
            }
            catch (OperationCanceledException) when (stopping.IsCancellationRequested)
            {
                return;
            }
            catch (ReplicaFaultedException)
            {
                // Faulted again while repairing: the fault closed this connection and woke the
                // maintainer, which reconnects after the replica's backoff.
                return;
            }
            catch (Exception e)
            {
                if (attached)
                {
                    bool faulted = await engine.InvokeAsync(() =>
                    {
                        if (replica.Connection == connection)
                        {
                            engine.Fault(replica, $"live repair failed: {e.Message}");
                            return true;
                        }
                        engine.Close(connection);
                        return false;
                    });
                    if (faulted)
                    {
                        return; // the fault signalled a reconnect
                    }
                }
                else if (connection.Client is not null)
                {
                    await connection.Client.DisposeAsync();
                }
                if (e is DownstairsRefusedException refused)
                {
                    // Not "down" but answering no (another region at this address, a newer
                    // generation, a shape mismatch): its own warning, not hidden behind "unreachable".
                    engine.Throttle.Report(LogLevel.Warning, $"replica {_index} ({replica.EndPoint}) refused ({refused.Result.Code})", () => $"{e.Message}; retrying");
                }
                else
                {
                    engine.Throttle.Report(LogLevel.Information, $"replica {_index} ({replica.EndPoint}) unreachable", () => $"{e.Message}; retrying");
                }
                await Task.Delay(delay, engine.Time, stopping).ContinueWith(static _ => { }, TaskScheduler.Default);
                delay = TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, _options.ReconnectMaxDelay.Ticks));
            }
        }
    }

    /// <summary>
    /// Brings a connected replica back: from this moment it receives every write (so nothing new is
    /// missed), while what it may lack is copied from a replica in service, several extents at a
    /// time. With a valid changed-block record only the granules it missed are copied (in place);
    /// without one, or where its copy is uncertain, every differing extent is copied whole.
    /// </summary>
    private async Task LiveRepairAsync(ReplicaConnection connection, CancellationToken cancellationToken)
    {
        (List<int> extents, ValueTask<JobOutcome> marked, ValueTask<JobOutcome>? announced, ulong flushNumber) = await engine.InvokeAsync(() =>
        {
            // This connection answers every fault signalled so far (one may have arrived while the
            // maintainer was already retrying); a leftover signal would trigger a second reconnect.
            while (engine.Reconnect[_index].Wait(0))
            {
            }
            HelloReply region = connection.Region;
            var needed = new HashSet<int>(engine.Dirty);
            needed.UnionWith(replica.PendingRepair); // what it missed, and what an interrupted repair left
            needed.UnionWith(replica.Changes.Extents);
            foreach (List<int> flushing in engine.Flushing.Values)
            {
                needed.UnionWith(flushing);
            }
            for (int e = 0; e < engine.ExtentCount; e++)
            {
                ExtentMeta have = region.Extents[e];
                ExtentMeta want = engine.Expected[e];
                if (have.Dirty || want.Dirty || have.Generation != want.Generation || have.FlushNumber != want.FlushNumber)
                {
                    needed.Add(e);
                }
            }
            // Extents dirty on the replica first: they include any whose fdatasync failed (the
            // downstairs keeps those "poisoned" until they are replaced).
            List<int> chosen = [.. needed.OrderBy(e => region.Extents[e].Dirty ? 0 : 1).ThenBy(e => e)];
            replica.PendingRepair.Clear();
            replica.PendingRepair.UnionWith(chosen);
            replica.BeginRepair(connection, chosen.Count);
            replica.RepairMode = replica.Changes.Valid ? "changed-blocks" : "extents";
            replica.RepairStartedAt = engine.Time.GetTimestamp();
            replica.RepairBytesDone = 0;
            replica.RepairBytesTotal = chosen.Sum(e => EstimatedBytes(connection, e));
            // Posted now, so they are dispatched before any write or flush reaches the replica (the
            // connection keeps order): its flushes must leave these extents unstamped until their
            // copies are committed, or a crash mid-repair would leave stale data recorded as current.
            ValueTask<JobOutcome> mark = engine.MarkRepairPendingAsync(connection, chosen);
            // Then a flush with the current flush number: the downstairs accepts a repair commit at our
            // generation only up to a flush number it has seen, and this replica may have missed the
            // flushes that stamped the source's copies. It stamps nothing: every extent dirty on the
            // replica is in the pending set, and nothing has been written on this connection yet.
            ValueTask<JobOutcome>? announce = engine.FlushNumber > 0 ? engine.FlushOneAsync(connection, engine.FlushNumber) : null;
            return (chosen, mark, announce, engine.FlushNumber);
        });
        JobOutcome mark = await marked;
        if (!mark.Ok)
        {
            throw new InvalidOperationException($"marking {extents.Count} extents for repair failed: {mark.Result}");
        }
        if (announced is { } pending && await pending is { Ok: false } announce)
        {
            throw new InvalidOperationException($"announcing flush number {flushNumber} before repair failed: {announce.Result}");
        }
        (bool quiet, long bytesToCopy, string mode) = await engine.InvokeAsync(() => (replica.ReconnectDelay > TimeSpan.Zero, replica.RepairBytesTotal, replica.RepairMode!));
        if (!quiet)
        {
            EngineLog.RepairStarted(engine.Logger, _index, extents.Count, engine.ExtentCount, bytesToCopy / 1048576.0, mode);
        }
        long started = engine.Time.GetTimestamp();
        var pacing = new Pacing(engine, replica, connection);
        try
        {
            // A few passes at most: one normally; another only if extents were left pending (a copy
            // that failed while this connection stayed, e.g. a source that failed mid-copy).
            for (int pass = 0; pass < 3 && extents.Count > 0; pass++)
            {
                await CopyAllAsync(extents, extent => RepairExtentAsync(connection, extent, pacing, cancellationToken), cancellationToken, _options.RepairParallelism, engine);
                extents = await engine.InvokeAsync(() =>
                {
                    if (replica.Connection != connection)
                    {
                        return [];
                    }
                    var left = new HashSet<int>(replica.PendingRepair);
                    left.UnionWith(replica.Changes.Extents);
                    return left.Order().ToList();
                });
            }
        }
        finally
        {
            double seconds = engine.Time.GetElapsedTime(started).TotalSeconds;
            await engine.InvokeAsync(() => replica.RepairSeconds += seconds);
        }
        (bool finished, long copied) = await engine.InvokeAsync(() =>
        {
            if (replica.Connection != connection)
            {
                return (false, 0L); // faulted again while repairing; the maintainer starts over
            }
            if (extents.Count > 0)
            {
                engine.Fault(replica, $"live repair left {extents.Count} extents uncopied after three passes");
                return (false, 0L);
            }
            long bytes = replica.RepairBytesDone;
            replica.FinishRepair();
            return (true, bytes);
        });
        if (finished)
        {
            EngineLog.RepairDone(engine.Logger, _index, pacing.Extents, copied / 1048576.0, engine.Time.GetElapsedTime(started).TotalSeconds);
        }
        else
        {
            throw new ReplicaFaultedException();
        }
    }

    /// <summary>What copying an extent will cost: whole, or the granules the record marks.</summary>
    private long EstimatedBytes(ReplicaConnection target, int extent) =>
        !replica.Changes.Valid || target.Region.Extents[extent].Uncertain
            ? (long)engine.ExtentBlocks * engine.BlockSize
            : replica.Changes.Contains(extent) ? ChangeRecord.Count(replica.Changes.Peek(extent)!) * replica.Changes.GranuleBytes : 0;

    /// <summary>Runs <paramref name="copy"/> over the extents, <see cref="EngineOptions.RepairParallelism"/> at a time; the first failure ends it.</summary>
    internal static async Task CopyAllAsync(IReadOnlyList<int> extents, Func<int, Task> copy, CancellationToken cancellationToken, int parallelism = 0,
        Engine? pacedBy = null)
    {
        int next = -1;
        using var failed = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        async Task Worker(int worker)
        {
            while (!failed.IsCancellationRequested)
            {
                // While the guest does IO one copy runs (measured: four side by side took half the
                // guest's IOPS in the slow-replica incident); the others join when it is idle.
                while (worker > 0 && pacedBy is not null && GuestBusy(pacedBy) && !failed.IsCancellationRequested && Volatile.Read(ref next) + 1 < extents.Count)
                {
                    await Task.Delay(GuestIdleAfter, pacedBy.Time, failed.Token).ContinueWith(static _ => { }, TaskScheduler.Default);
                }
                int i = Interlocked.Increment(ref next);
                if (i >= extents.Count)
                {
                    return;
                }
                try
                {
                    await copy(extents[i]);
                }
                catch
                {
                    await failed.CancelAsync(); // the others stop after their current extent
                    throw;
                }
            }
        }
        int workers = Math.Min(parallelism > 0 ? parallelism : 4, extents.Count);
        Task[] running = [.. Enumerable.Range(0, workers).Select(w => Task.Run(() => Worker(w), CancellationToken.None))];
        try
        {
            await Task.WhenAll(running);
        }
        catch when (running.FirstOrDefault(t => t.IsFaulted)?.Exception?.InnerException is { } first)
        {
            // The first real failure, not the cancellation it caused in the other workers.
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(first);
        }
    }

    private async Task RepairExtentAsync(ReplicaConnection target, int extent, Pacing pacing, CancellationToken cancellationToken)
    {
        // Sources that failed this extent (an error, or metadata no honest replica can hold): the
        // next attempt goes to another one, so one bad source cannot stall the repair.
        var failedSources = new HashSet<ReplicaConnection>();
        while (true)
        {
            cancellationToken.ThrowIfCancellationRequested();
            (bool gone, ReplicaConnection? source, RepairCopy? copy) = await engine.InvokeAsync<(bool, ReplicaConnection?, RepairCopy?)>(() =>
            {
                if (replica.Connection != target)
                {
                    return (true, null, null);
                }
                ReplicaConnection? from = engine.Replicas.FirstOrDefault(r => r.InService && r.Connection is not null && !failedSources.Contains(r.Connection))?.Connection;
                if (from is null)
                {
                    return (false, null, null);
                }
                long estimate = EstimatedBytes(target, extent);
                RepairCopy started = engine.RepairCopies.Begin(replica, target, extent);
                // Decided as the copy starts: the record may have been dropped since the repair began.
                started.Whole = !replica.Changes.Valid || target.Region.Extents[extent].Uncertain;
                // Taken either way: a whole copy brings the marked granules too (put back if it fails).
                started.Taken = replica.Changes.Take(extent);
                long bytes = started.Whole ? (long)engine.ExtentBlocks * engine.BlockSize
                    : started.Taken is null ? 0 : ChangeRecord.Count(started.Taken) * replica.Changes.GranuleBytes;
                replica.RepairBytesTotal += bytes - Math.Min(estimate, bytes);
                return (false, from, started);
            });
            if (gone)
            {
                throw new ReplicaFaultedException();
            }
            if (source is null)
            {
                // No healthy copy to repair from right now; wait for one rather than copy garbage.
                failedSources.Clear();
                await Task.Delay(TimeSpan.FromMilliseconds(200), engine.Time, cancellationToken);
                continue;
            }
            bool committed = false;
            try
            {
                RepairCopy started = copy!;
                Action committing = () => engine.RepairCopies.Commit(started);
                if (started.Whole)
                {
                    await ExtentCopier.CopyAsync(engine, source, target, extent, null, pacing, committing, cancellationToken);
                }
                else
                {
                    await ExtentCopier.CatchUpAsync(engine, source, target, extent, started.Taken, replica.Changes.GranuleBlocks, pacing, committing,
                        () => engine.RepairCopies.ReleaseHeld(started), cancellationToken);
                }
                committed = true;
            }
            catch (RepairSourceException e)
            {
                // The source failed (and is being faulted by its own jobs) or lied: try the next one.
                failedSources.Add(source);
                engine.Throttle.Report(LogLevel.Warning, $"replica {_index} repair: a source failed", () => $"{e.Message}; trying another source");
            }
            finally
            {
                RepairCopy ended = copy!;
                await engine.InvokeAsync(() => engine.RepairCopies.End(ended, committed)); // on success also takes the extent off PendingRepair
            }
            if (committed)
            {
                Interlocked.Increment(ref pacing.Extents);
                if (engine.Time.GetElapsedTime(Interlocked.Read(ref pacing.LastLog)) > ProgressLogInterval)
                {
                    Interlocked.Exchange(ref pacing.LastLog, engine.Time.GetTimestamp());
                    (int done, int total, long bytes, double rate) = await engine.InvokeAsync(() =>
                        (replica.RepairDone, replica.RepairTotal, replica.RepairBytesDone, replica.RepairBytesDone / Math.Max(0.001, engine.Time.GetElapsedTime(replica.RepairStartedAt).TotalSeconds)));
                    EngineLog.RepairProgress(engine.Logger, _index, done, total, bytes / 1048576.0, rate / 1048576.0);
                }
                return;
            }
            await Task.Delay(TimeSpan.FromMilliseconds(50), engine.Time, cancellationToken);
        }
    }

    /// <summary>One repair's pace (rate limit, duty cycle) and progress, shared by its parallel copies.</summary>
    private sealed class Pacing(Engine engine, Replica replica, ReplicaConnection target) : ExtentCopier.IPacing
    {
        private readonly RepairThrottle _throttle = new(engine);

        public int Extents;

        public long LastLog = engine.Time.GetTimestamp();

        public ValueTask BeforeAsync(long bytes, CancellationToken cancellationToken) => _throttle.TakeAsync(bytes, cancellationToken);

        public async ValueTask AfterAsync(long bytes, long started, CancellationToken cancellationToken)
        {
            await engine.InvokeAsync(() =>
            {
                if (replica.Connection == target)
                {
                    replica.RepairBytesDone += bytes;
                }
                replica.RepairBytesCopied += bytes;
            });
            await PaceAsync(engine, started, engine.Pace.DutyCycle, cancellationToken);
        }
    }

    /// <summary>
    /// Background work (repair, scrub) keeps at most <paramref name="busyDutyCycle"/> of the time while
    /// the guest does IO: after a step that took t it pauses t·(1 − d)/d, at most
    /// <see cref="EngineOptions.RepairMaxPause"/>. With the guest idle it runs at <see cref="EngineOptions.IdleRepairDutyCycle"/>.
    /// </summary>
    private static bool GuestBusy(Engine engine) => engine.Time.GetElapsedTime(Volatile.Read(ref engine.LastGuestIo)) < GuestIdleAfter;

    internal static async Task PaceAsync(Engine engine, long stepStarted, double busyDutyCycle, CancellationToken cancellationToken, int workers = 1)
    {
        EngineOptions options = engine.Options;
        bool guestBusy = GuestBusy(engine);
        double duty = guestBusy ? busyDutyCycle : options.IdleRepairDutyCycle;
        if (duty < 1)
        {
            // With several copies side by side (scrub, or workers), each pauses that many times longer.
            TimeSpan pause = engine.Time.GetElapsedTime(stepStarted) * ((1 - duty) / duty * Math.Max(1, workers));
            await Task.Delay(pause < options.RepairMaxPause ? pause : options.RepairMaxPause, engine.Time, cancellationToken);
        }
    }

}

/// <summary>The replica was faulted (its connection replaced or closed) while its repair ran.</summary>
internal sealed class ReplicaFaultedException() : Exception("faulted during repair");
