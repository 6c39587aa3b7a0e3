using System.Buffers;
using System.Diagnostics;
using NbdServer.Common.Volumes;
using NbdServer.Protocol;
using Microsoft.Extensions.Logging;

namespace NbdServer.ReplicaEngine;

// Activation (fencing, reconciliation), reconnection, live repair, the watchdog, status.
public sealed partial class ReplicatedVolume
{
    private static readonly TimeSpan WatchdogInterval = TimeSpan.FromMilliseconds(200);
    private static readonly TimeSpan ProgressLogInterval = TimeSpan.FromSeconds(2);

    /// <summary>A snapshot for `nbd-server status` and the control endpoint.</summary>
    public EngineStatus GetStatus()
    {
        lock (_gate)
        {
            return new EngineStatus(Generation, _flushNumber, Size, _blockSize, _extentCount, InServiceCountLocked(),
                [.. _links.Select(l => new ReplicaStatus(l.Index, l.EndPoint.ToString(), l.State, l.OutstandingJobs, l.OutstandingBytes,
                    l.Completed, Math.Round(l.CompletedPerSecond, 1), l.Errors, l.Faults, l.LastFault, l.RepairDone, l.RepairTotal))])
            {
                Scrub = Scrub,
                Startup = _startup,
            };
        }
    }

    private async Task ActivateAsync(CancellationToken cancellationToken)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _stopping.Token);
        timeout.CancelAfter(_options.StartupTimeout);

        // 1. Probe (read-only hellos are never fenced) for each region's geometry and highest generation.
        HelloReply?[] probes;
        try
        {
            probes = await ProbeAsync(timeout.Token);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested && !_stopping.IsCancellationRequested)
        {
            // StartupTimeout ran out (not a shutdown): tell the operator why, not "the operation was canceled".
            throw new InvalidOperationException($"fewer than two downstairs reachable within {_options.StartupTimeout.TotalSeconds:0.#} s ({string.Join(", ", _options.Downstairs)}): cannot start a replicated volume");
        }
        // A replica far ahead of all the others in generation or flush number cannot be honest (the
        // downstairs bound both steps); following it would get our activation refused by the honest
        // ones, or plant a flush number at the ceiling. Leave it out; the others decide.
        LeaveOutImplausible(probes, "probe");
        if (probes.Count(p => p is not null) < 2)
        {
            throw new InvalidOperationException("fewer than two downstairs report plausible generations and flush numbers (see the 'misbehaving' warnings): cannot start a replicated volume");
        }
        HelloReply first = probes.First(p => p is not null)!;
        foreach (HelloReply? probe in probes)
        {
            if (probe is not null && (probe.BlockSize != first.BlockSize || probe.ExtentBlocks != first.ExtentBlocks || probe.ExtentCount != first.ExtentCount))
            {
                throw new InvalidOperationException($"the downstairs regions differ in shape (block {probe.BlockSize}/{first.BlockSize}, extent {probe.ExtentBlocks}/{first.ExtentBlocks} blocks, {probe.ExtentCount}/{first.ExtentCount} extents): they are not replicas of one volume");
            }
        }
        _blockSize = first.BlockSize;
        _extentBlocks = first.ExtentBlocks;
        _extentCount = first.ExtentCount;
        Size = first.RegionBytes;
        int frameRoom = probes.Where(p => p is not null).Min(p => p!.MaxFrameBytes) - (64 << 10);
        int perBlock = _blockSize + BlockContext.Size;
        _maxIoBytes = Math.Max(1, Math.Min(32 << 20, frameRoom) / perBlock) * _blockSize;
        ulong highest = probes.Where(p => p is not null).Max(p => p!.HighestGeneration);
        // Validate() kept every highest below Wire.MaxGeneration: this cannot wrap (checked says so).
        Generation = _options.Generation ?? checked(highest + 1);
        if (Generation <= highest && _options.Generation is not null && Generation < highest)
        {
            throw new InvalidOperationException($"generation {Generation} is older than generation {highest}, which a replica has already seen; choose a higher one (or omit --generation)");
        }

        // 2. Connect read-write with our generation: from now on older upstairs are fenced out. One
        // replica that refuses (or answers nonsense) does not decide for the others: two suffice,
        // and the reconnect loop brings the third in later through live repair.
        var connected = new List<(ReplicaLink Link, IDownstairs Client)>();
        var replies = new HelloReply?[_links.Length];
        for (int i = 0; i < _links.Length; i++)
        {
            if (probes[i] is null)
            {
                continue;
            }
            IDownstairs client;
            try
            {
                client = await _connector.ConnectAsync(i, Hello(probes[i]!.RegionId), timeout.Token);
                if (ImplausibleActivationReply(client.Region) is { } why)
                {
                    await client.DisposeAsync();
                    throw new DownstairsProtocolException($"misbehaving replica: {why}");
                }
            }
            catch (Exception e) when (e is DownstairsRefusedException or DownstairsProtocolException or DownstairsConnectionException)
            {
                string what = e is DownstairsRefusedException r ? $"refused ({r.Result.Code})" : e is DownstairsProtocolException ? "misbehaving" : "unreachable";
                _throttle.Report(LogLevel.Warning, $"replica {i} ({_links[i].EndPoint}) {what} at activation", () => $"{e.Message}; starting without it");
                continue;
            }
            _links[i].RegionId = client.Region.RegionId;
            connected.Add((_links[i], client));
            replies[i] = client.Region;
        }
        // The read-write reply is a second answer: a liar can change its story after the probe.
        LeaveOutImplausible(replies, "activation");
        foreach ((ReplicaLink link, IDownstairs client) in connected.Where(c => replies[c.Link.Index] is null).ToList())
        {
            connected.Remove((link, client));
            await client.DisposeAsync();
        }
        if (connected.Count < 2)
        {
            foreach ((_, IDownstairs client) in connected)
            {
                await client.DisposeAsync();
            }
            throw new InvalidOperationException($"only {connected.Count} downstairs accepted activation at generation {Generation} (see the warnings): cannot start a replicated volume");
        }
        foreach ((ReplicaLink link, IDownstairs client) in connected)
        {
            EngineLog.Connected(_logger, link.Index, link.EndPoint.ToString(), client.Region.RegionId, client.Region.ExtentCount, (long)client.Region.ExtentBlocks * client.Region.BlockSize, client.Region.BlockSize);
        }

        // 3. Reconcile: per extent, highest generation then highest flush number wins; dirty or differing copies are replaced.
        _expected = new ExtentMeta[_extentCount];
        int repaired = 0;
        ulong maxFlush = 0;
        long reconcileStarted = Stopwatch.GetTimestamp();
        long lastProgressLog = reconcileStarted;
        for (int e = 0; e < _extentCount; e++)
        {
            lock (_gate)
            {
                _startup = new StartupStatus("reconciling", e, _extentCount, repaired);
            }
            if (Stopwatch.GetElapsedTime(lastProgressLog) > ProgressLogInterval)
            {
                // A replaced or long-dead replica can need every extent copied before the guest is served.
                lastProgressLog = Stopwatch.GetTimestamp();
                EngineLog.ReconcileProgress(_logger, e, _extentCount, repaired, Stopwatch.GetElapsedTime(reconcileStarted).TotalSeconds);
            }
            (ReplicaLink Link, IDownstairs Client) winner = connected[0];
            foreach (var c in connected)
            {
                ExtentMeta m = c.Client.Region.Extents[e];
                ExtentMeta w = winner.Client.Region.Extents[e];
                if (m.Generation > w.Generation || (m.Generation == w.Generation && m.FlushNumber > w.FlushNumber))
                {
                    winner = c;
                }
            }
            ExtentMeta best = winner.Client.Region.Extents[e];
            _expected[e] = best;
            maxFlush = Math.Max(maxFlush, best.FlushNumber);
            bool anyDirty = connected.Exists(c => c.Client.Region.Extents[e].Dirty);
            foreach (var c in connected)
            {
                if (c.Link == winner.Link)
                {
                    continue;
                }
                ExtentMeta m = c.Client.Region.Extents[e];
                if (anyDirty || m.Generation != best.Generation || m.FlushNumber != best.FlushNumber)
                {
                    await CopyExtentAsync(winner.Client, c.Client, e, best, timeout.Token);
                    repaired++;
                }
            }
            if (anyDirty)
            {
                // The next flush will stamp it; until then a returning replica must copy it.
                _dirty.Add(e);
            }
        }
        _flushNumber = maxFlush;

        lock (_gate)
        {
            foreach ((ReplicaLink link, IDownstairs client) in connected)
            {
                link.Client = client;
                link.Region = client.Region;
                link.State = ReplicaState.Active;
            }
            foreach (ReplicaLink link in _links.Where(l => l.State == ReplicaState.Connecting))
            {
                link.RequestConnection();
            }
        }
        EngineLog.Reconciled(_logger, Generation, connected.Count, repaired, _flushNumber);
        foreach (ReplicaLink link in _links)
        {
            _maintainers.Add(Task.Run(() => MaintainAsync(link)));
        }
        _watchdog = TimeProvider.System.CreateTimer(_ => Watchdog(), null, WatchdogInterval, WatchdogInterval);
        if (_options.ScrubInterval > TimeSpan.Zero)
        {
            _maintainers.Add(Task.Run(() => PeriodicScrubAsync(_stopping.Token)));
        }
    }

    /// <summary>
    /// Leaves out (sets to null, with a "misbehaving replica" warning) each reply whose highest
    /// generation or highest flush number lies more than the step above every other reply's. Judged
    /// against the others as reported (not iteratively), so honest replicas that lag are never left
    /// out because of a liar ahead of them; with two liars there is no honest majority anyway.
    /// </summary>
    private void LeaveOutImplausible(HelloReply?[] replies, string stage)
    {
        var reasons = new string?[replies.Length];
        for (int i = 0; i < replies.Length; i++)
        {
            if (replies[i] is not { } mine)
            {
                continue;
            }
            ulong othersGeneration = 0;
            ulong othersFlush = 0;
            bool anyOther = false;
            for (int j = 0; j < replies.Length; j++)
            {
                if (j != i && replies[j] is { } other)
                {
                    anyOther = true;
                    othersGeneration = Math.Max(othersGeneration, other.HighestGeneration);
                    othersFlush = Math.Max(othersFlush, HighestFlush(other));
                }
            }
            if (!anyOther)
            {
                continue;
            }
            ulong flush = HighestFlush(mine);
            // Each subtraction only after the comparison that keeps it from wrapping.
            if (mine.HighestGeneration > othersGeneration && mine.HighestGeneration - othersGeneration > _options.MaxGenerationStep)
            {
                reasons[i] = $"highest generation {mine.HighestGeneration} is more than {_options.MaxGenerationStep} (MaxGenerationStep) above the others' {othersGeneration}";
            }
            else if (flush > othersFlush && flush - othersFlush > _options.MaxFlushStep)
            {
                reasons[i] = $"highest flush number {flush} is more than {_options.MaxFlushStep} (MaxFlushStep) above the others' {othersFlush}";
            }
        }
        for (int i = 0; i < replies.Length; i++)
        {
            if (reasons[i] is { } why)
            {
                replies[i] = null;
                _throttle.Report(LogLevel.Warning, $"replica {i} ({_links[i].EndPoint}) misbehaving at {stage}", () => $"misbehaving replica: its {why}; not used (live repair replaces its copy)");
            }
        }
    }

    private static ulong HighestFlush(HelloReply reply)
    {
        ulong highest = 0;
        foreach (ExtentMeta m in reply.Extents)
        {
            highest = Math.Max(highest, m.FlushNumber);
        }
        return highest;
    }

    /// <summary>Why a read-write Hello reply cannot be honest, or null: after our Hello no extent can carry a newer generation than ours.</summary>
    private string? ImplausibleActivationReply(HelloReply reply)
    {
        for (int e = 0; e < reply.Extents.Length; e++)
        {
            ExtentMeta m = reply.Extents[e];
            if (m.Generation > Generation)
            {
                return $"extent {e} has generation {m.Generation}, above generation {Generation} it has just accepted";
            }
            if (m.FlushNumber >= Wire.MaxFlushNumber)
            {
                return $"extent {e} has flush number {m.FlushNumber}, at or above the ceiling {Wire.MaxFlushNumber}";
            }
        }
        return null;
    }

    private HelloRequest Hello(Guid regionId, bool readOnly = false) =>
        new(Wire.ProtocolVersion, readOnly, regionId, _upstairsId, _sessionId, readOnly ? 0 : Generation);

    /// <summary>Probes all three; returns once all answered, or once two did and the wait for the third ran out.</summary>
    private async Task<HelloReply?[]> ProbeAsync(CancellationToken startupToken)
    {
        // Probes still retrying when startup goes on (a replica that is down) must end here: the
        // reconnect loop takes that replica over. Left running they would probe it forever, even
        // after the volume is disposed.
        using var probing = CancellationTokenSource.CreateLinkedTokenSource(startupToken);
        try
        {
            return await ProbeAllAsync(probing.Token);
        }
        finally
        {
            await probing.CancelAsync();
        }
    }

    private async Task<HelloReply?[]> ProbeAllAsync(CancellationToken cancellationToken)
    {
        var probes = new HelloReply?[_links.Length];
        Task[] tasks = [.. _links.Select((link, i) => Task.Run(async () =>
        {
            TimeSpan delay = _options.ReconnectInitialDelay;
            while (!cancellationToken.IsCancellationRequested)
            {
                try
                {
                    await using IDownstairs probe = await _connector.ConnectAsync(i, Hello(Guid.Empty, readOnly: true), cancellationToken);
                    probe.Region.Validate();
                    probes[i] = probe.Region;
                    return;
                }
                catch (DownstairsProtocolException e)
                {
                    // Not down: answering with nonsense. Left out of this activation (the others decide the
                    // generation); the reconnect loop keeps trying it later like any absent replica.
                    _throttle.Report(LogLevel.Warning, $"replica {i} ({link.EndPoint}) misbehaving", () => $"{e.Message}; not used");
                    await Task.Delay(delay, cancellationToken).ContinueWith(static _ => { }, TaskScheduler.Default);
                    delay = TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, _options.ReconnectMaxDelay.Ticks));
                }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    _throttle.Report(LogLevel.Information, $"replica {i} ({link.EndPoint}) unreachable", () => $"{e.Message}; retrying");
                    await Task.Delay(delay, cancellationToken).ContinueWith(static _ => { }, TaskScheduler.Default);
                    delay = TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, _options.ReconnectMaxDelay.Ticks));
                }
            }
        }, CancellationToken.None))];
        Task all = Task.WhenAll(tasks);
        await Task.WhenAny(all, Task.Delay(_options.StartupWaitForAll, cancellationToken)).ContinueWith(static _ => { }, TaskScheduler.Default);
        while (probes.Count(p => p is not null) < 2)
        {
            cancellationToken.ThrowIfCancellationRequested();
            await Task.WhenAny(all, Task.Delay(100, cancellationToken)).ContinueWith(static _ => { }, TaskScheduler.Default);
            if (all.IsCompleted && probes.Count(p => p is not null) < 2)
            {
                break;
            }
        }
        if (probes.Count(p => p is not null) < 2)
        {
            throw new InvalidOperationException($"fewer than two downstairs reachable within {_options.StartupTimeout.TotalSeconds:0} s ({string.Join(", ", _options.Downstairs)}): cannot start a replicated volume");
        }
        return probes;
    }

    /// <summary>The background life of one replica: whenever it is out of service, reconnect (with backoff) and live-repair it.</summary>
    private async Task MaintainAsync(ReplicaLink link)
    {
        CancellationToken stopping = _stopping.Token;
        while (!stopping.IsCancellationRequested)
        {
            try
            {
                await link.NeedsConnection.WaitAsync(stopping);
                TimeSpan backoff;
                lock (_gate)
                {
                    if (link.Client is not null)
                    {
                        // A stale wake-up: the fault that signalled it was already answered by a
                        // reconnect. Connecting again would fence the healthy connection.
                        continue;
                    }
                    backoff = link.ReconnectDelay;
                }
                if (backoff > TimeSpan.Zero)
                {
                    await Task.Delay(backoff, stopping);
                }
            }
            catch (OperationCanceledException)
            {
                return;
            }
            TimeSpan delay = _options.ReconnectInitialDelay;
            while (!stopping.IsCancellationRequested)
            {
                IDownstairs? client = null;
                try
                {
                    client = await _connector.ConnectAsync(link.Index, Hello(link.RegionId), stopping);
                    HelloReply r = client.Region;
                    r.Validate();
                    if (r.BlockSize != _blockSize || r.ExtentBlocks != _extentBlocks || r.ExtentCount != _extentCount)
                    {
                        throw new InvalidOperationException($"region has a different shape ({r.ExtentCount} extents of {r.ExtentBlocks} × {r.BlockSize} bytes)");
                    }
                    if (link.RegionId == Guid.Empty)
                    {
                        link.RegionId = r.RegionId;
                    }
                    if (link.ReconnectDelay > TimeSpan.Zero)
                    {
                        // Flapping: one line per interval, not one per cycle.
                        _throttle.Report(LogLevel.Information, $"Replica {link.Index} ({link.EndPoint}) reconnected", () => "live repair starts again");
                    }
                    else
                    {
                        EngineLog.Connected(_logger, link.Index, link.EndPoint.ToString(), r.RegionId, r.ExtentCount, (long)r.ExtentBlocks * r.BlockSize, r.BlockSize);
                    }
                    await LiveRepairAsync(link, client, stopping);
                    break;
                }
                catch (OperationCanceledException) when (stopping.IsCancellationRequested)
                {
                    return;
                }
                catch (Exception e)
                {
                    if (client is not null)
                    {
                        lock (_gate)
                        {
                            if (link.Client == client)
                            {
                                FaultLocked(link, $"live repair failed: {e.Message}");
                                break;
                            }
                        }
                        await client.DisposeAsync();
                    }
                    if (e is DownstairsRefusedException refused)
                    {
                        // Not "down" but answering no (another region at this address, a newer
                        // generation, a shape mismatch): its own warning, not hidden behind "unreachable".
                        _throttle.Report(LogLevel.Warning, $"replica {link.Index} ({link.EndPoint}) refused ({refused.Result.Code})", () => $"{e.Message}; retrying");
                    }
                    else
                    {
                        _throttle.Report(LogLevel.Information, $"replica {link.Index} ({link.EndPoint}) unreachable", () => $"{e.Message}; retrying");
                    }
                    await Task.Delay(delay, stopping).ContinueWith(static _ => { }, TaskScheduler.Default);
                    delay = TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, _options.ReconnectMaxDelay.Ticks));
                }
            }
        }
    }

    /// <summary>
    /// Brings a connected replica back: from this moment it receives every write (so nothing new is
    /// missed), while the extents it may lack are copied one at a time from a replica in service.
    /// </summary>
    private async Task LiveRepairAsync(ReplicaLink link, IDownstairs client, CancellationToken cancellationToken)
    {
        List<int> extents;
        Task<DownstairsResult> marked;
        Task<DownstairsResult>? announced;
        lock (_gate)
        {
            link.Client = client;
            // This connection answers every fault signalled so far (one may have arrived while the
            // maintainer was already retrying); a leftover signal would trigger a second reconnect.
            while (link.NeedsConnection.Wait(0))
            {
            }
            link.Region = client.Region;
            var needed = new HashSet<int>(_dirty);
            needed.UnionWith(link.PendingRepair); // left over from an interrupted repair
            foreach (HashSet<int> flushing in _flushing.Values)
            {
                needed.UnionWith(flushing);
            }
            for (int e = 0; e < _extentCount; e++)
            {
                ExtentMeta have = client.Region.Extents[e];
                ExtentMeta want = _expected[e];
                if (have.Dirty || want.Dirty || have.Generation != want.Generation || have.FlushNumber != want.FlushNumber)
                {
                    needed.Add(e);
                }
            }
            // Extents dirty on the replica first: they include any whose fdatasync failed (the
            // downstairs keeps those "poisoned" until they are replaced).
            extents = [.. needed.OrderBy(e => client.Region.Extents[e].Dirty ? 0 : 1).ThenBy(e => e)];
            link.PendingRepair.Clear();
            link.PendingRepair.UnionWith(extents);
            // Sent before the replica is given any write or flush (the connection keeps order): its
            // flushes must leave these extents unstamped until their copies are committed, or a crash
            // mid-repair would leave stale data recorded as current.
            marked = client.MarkRepairPendingAsync(++_nextJobId, extents);
            // Then a flush with the current flush number: the downstairs accepts a repair commit at our
            // generation only up to a flush number it has seen, and this replica may have missed the
            // flushes that stamped the source's copies. It stamps nothing: every extent dirty on the
            // replica is in the pending set, and nothing has been written on this connection yet.
            announced = _flushNumber > 0 ? client.FlushAsync(++_nextJobId, _flushNumber, Generation) : null;
            link.State = ReplicaState.Repairing;
            link.RepairTotal = extents.Count;
            link.RepairDone = 0;
            SignalStateChangedLocked();
        }
        DownstairsResult mark = await marked.WaitAsync(cancellationToken);
        if (!mark.IsOk)
        {
            throw new InvalidOperationException($"marking {extents.Count} extents for repair failed: {mark}");
        }
        if (announced is not null && await announced.WaitAsync(cancellationToken) is { IsOk: false } announce)
        {
            throw new InvalidOperationException($"announcing flush number {_flushNumber} before repair failed: {announce}");
        }
        if (link.ReconnectDelay == TimeSpan.Zero)
        {
            EngineLog.RepairStarted(_logger, link.Index, extents.Count, _extentCount);
        }
        long started = Stopwatch.GetTimestamp();
        long lastLog = started;
        long extentBytes = (long)_extentBlocks * _blockSize;
        foreach (int extent in extents)
        {
            // Sources that failed this extent (an error, or metadata no honest replica can hold): the
            // next attempt goes to another one, so one bad source cannot stall the repair.
            var failedSources = new HashSet<IDownstairs>();
            while (true)
            {
                IDownstairs? source;
                lock (_gate)
                {
                    if (link.Client != client)
                    {
                        return; // faulted again while repairing; the maintainer starts over
                    }
                    source = _links.FirstOrDefault(l => l.State == ReplicaState.Active && l.Client is not null && !failedSources.Contains(l.Client))?.Client;
                }
                if (source is null)
                {
                    // No healthy copy to repair from right now; wait for one rather than copy garbage.
                    failedSources.Clear();
                    await Task.Delay(200, cancellationToken);
                    continue;
                }
                try
                {
                    RepairCopy copy = BeginRepairCopy(link, client, extent);
                    bool committed = false;
                    long copyStarted = Stopwatch.GetTimestamp();
                    try
                    {
                        await CopyExtentAsync(source, client, extent, null, cancellationToken);
                        committed = true;
                    }
                    finally
                    {
                        EndRepairCopy(copy, committed); // on success also takes the extent off PendingRepair
                    }
                    await PaceAsync(copyStarted, _options.RepairDutyCycle, cancellationToken);
                    break;
                }
                catch (RepairSourceException e)
                {
                    // The source failed (and is being faulted by its own jobs) or lied: try the next one.
                    failedSources.Add(source);
                    _throttle.Report(LogLevel.Warning, $"replica {link.Index} repair: a source failed", () => $"{e.Message}; trying another source");
                    await Task.Delay(50, cancellationToken);
                }
            }
            if (Stopwatch.GetElapsedTime(lastLog) > ProgressLogInterval)
            {
                lastLog = Stopwatch.GetTimestamp();
                double mib = link.RepairDone * extentBytes / 1048576.0;
                EngineLog.RepairProgress(_logger, link.Index, link.RepairDone, link.RepairTotal, mib, mib / Stopwatch.GetElapsedTime(started).TotalSeconds);
            }
        }
        lock (_gate)
        {
            if (link.Client != client)
            {
                return;
            }
            link.State = ReplicaState.Active;
            SignalStateChangedLocked();
        }
        EngineLog.RepairDone(_logger, link.Index, extents.Count, extents.Count * extentBytes / 1048576.0, Stopwatch.GetElapsedTime(started).TotalSeconds);
    }

    /// <summary>
    /// Background work (repair, scrub) keeps at most <paramref name="busyDutyCycle"/> of the time while
    /// the guest does IO: after a step that took t it pauses t·(1 − d)/d, at most
    /// <see cref="EngineOptions.RepairMaxPause"/>. With the guest idle it runs at <see cref="EngineOptions.IdleRepairDutyCycle"/>.
    /// </summary>
    private async Task PaceAsync(long stepStarted, double busyDutyCycle, CancellationToken cancellationToken)
    {
        bool guestBusy = Stopwatch.GetElapsedTime(Volatile.Read(ref _lastGuestIo)) < GuestIdleAfter;
        double duty = guestBusy ? busyDutyCycle : _options.IdleRepairDutyCycle;
        if (duty < 1)
        {
            TimeSpan pause = Stopwatch.GetElapsedTime(stepStarted) * ((1 - duty) / duty);
            await Task.Delay(pause < _options.RepairMaxPause ? pause : _options.RepairMaxPause, cancellationToken);
        }
    }

    /// <summary>
    /// Copies one extent, chunk by chunk (contexts and data as stored), then commits it with the
    /// source's metadata — only if that metadata is no newer than <paramref name="expected"/> (what the
    /// source reported at activation) or, when null, than the engine's own generation and flush number
    /// (read after the reply: every number a flush stamps was taken from the counter before it was
    /// sent). The commit plants the metadata on the target, so a source lying here could plant a
    /// number nobody can step past.
    /// </summary>
    private async Task CopyExtentAsync(IDownstairs source, IDownstairs target, int extent, ExtentMeta? expected, CancellationToken cancellationToken)
    {
        int chunkBlocks = Math.Max(1, Math.Min(_extentBlocks, _options.RepairChunkBytes / _blockSize));
        byte[] contexts = ArrayPool<byte>.Shared.Rent(chunkBlocks * BlockContext.Size);
        byte[] data = ArrayPool<byte>.Shared.Rent(chunkBlocks * _blockSize);
        try
        {
            ExtentMeta meta = default;
            for (int first = 0; first < _extentBlocks; first += chunkBlocks)
            {
                int count = Math.Min(chunkBlocks, _extentBlocks - first);
                Memory<byte> ctx = contexts.AsMemory(0, count * BlockContext.Size);
                Memory<byte> blocks = data.AsMemory(0, count * _blockSize);
                ExtentReadResult read;
                try
                {
                    read = await source.ReadExtentAsync(NextJobId(), new ExtentRange(extent, first, count), ctx, blocks, cancellationToken);
                }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    throw new RepairSourceException(e.Message);
                }
                if (!read.Result.IsOk)
                {
                    throw new RepairSourceException(read.Result.ToString());
                }
                meta = read.Meta;
                ExtentMeta limit;
                lock (_gate)
                {
                    limit = expected ?? new ExtentMeta(Generation, _flushNumber, false);
                }
                if (meta.Generation > limit.Generation || meta.FlushNumber > limit.FlushNumber)
                {
                    throw new RepairSourceException($"misbehaving replica: extent {extent} read back as generation {meta.Generation} flush {meta.FlushNumber}, newer than generation {limit.Generation} flush {limit.FlushNumber}, the most it can hold");
                }
                DownstairsResult written = await target.WriteExtentAsync(NextJobId(), new ExtentRange(extent, first, count, first == 0 ? ExtentRange.BeginFlag : 0), ctx, blocks, cancellationToken);
                if (!written.IsOk)
                {
                    throw new InvalidOperationException($"repair write of extent {extent} failed: {written}");
                }
            }
            DownstairsResult committed = await target.CommitExtentAsync(NextJobId(), extent, meta, cancellationToken);
            if (!committed.IsOk)
            {
                throw new InvalidOperationException($"repair commit of extent {extent} failed: {committed}");
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(contexts);
            ArrayPool<byte>.Shared.Return(data);
        }
    }

    private ulong NextJobId()
    {
        lock (_gate)
        {
            return ++_nextJobId;
        }
    }

    /// <summary>Faults replicas that stopped making progress, and samples completion rates for status.</summary>
    private void Watchdog()
    {
        lock (_gate)
        {
            long now = Stopwatch.GetTimestamp();
            foreach (ReplicaLink link in _links)
            {
                long completed = link.Completed;
                link.CompletedPerSecond = (completed - link.CompletedAtLastSample) / WatchdogInterval.TotalSeconds;
                link.CompletedAtLastSample = completed;
                if (link.ReceivesWrites && link.OutstandingJobs > 0 && Stopwatch.GetElapsedTime(link.LastProgress, now) > _options.NoProgressTimeout)
                {
                    FaultLocked(link, $"no progress for {_options.NoProgressTimeout.TotalSeconds:0.#} s with {link.OutstandingJobs} jobs outstanding");
                }
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stopping.CancelAsync();
        if (_watchdog is not null)
        {
            await _watchdog.DisposeAsync();
        }
        await Task.WhenAll(_maintainers).WaitAsync(TimeSpan.FromSeconds(5)).ContinueWith(static _ => { }, TaskScheduler.Default);
        List<IDownstairs> clients;
        lock (_gate)
        {
            clients = [.. _links.Select(l => l.Client).OfType<IDownstairs>()];
            foreach (ReplicaLink link in _links)
            {
                link.Client = null;
                link.State = ReplicaState.Faulted;
            }
        }
        foreach (IDownstairs client in clients)
        {
            await client.DisposeAsync();
        }
        _throttle.Dispose();
        _stopping.Dispose();
    }

    private sealed class RepairSourceException(string message) : Exception(message);
}

/// <summary>Per-replica figures an operator watches during an incident.</summary>
public sealed record ReplicaStatus(int Index, string EndPoint, ReplicaState State, int OutstandingJobs, long OutstandingBytes,
    long Completed, double CompletedPerSecond, long Errors, long Faults, string? LastFault, int RepairDone, int RepairTotal);

public sealed record EngineStatus(ulong Generation, ulong FlushNumber, long Size, int BlockSize, int ExtentCount, int InService, ReplicaStatus[] Replicas)
{
    public ScrubStatus? Scrub { get; init; }

    /// <summary>Set until the volume serves: what startup is doing (a long reconciliation shows its progress here).</summary>
    public StartupStatus? Startup { get; init; }
}

/// <summary>Startup before the volume serves: "probing" the replicas, then "reconciling" extent by extent.</summary>
public sealed record StartupStatus(string Phase, int ExtentsDone, int ExtentTotal, int ExtentsRepaired);
