using Microsoft.Extensions.Logging;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// Startup, before the guest is served: probe the three replicas (read-only hellos are never
/// fenced), connect read-write with a new generation (older upstairs are fenced out from then on),
/// reconcile extent by extent (highest generation then highest flush number wins; dirty or
/// differing copies are replaced), then put the reconciled replicas in service.
/// </summary>
internal sealed class Activation(Engine engine, IDownstairsConnector connector, Func<Guid, bool, HelloRequest> hello, Action<StartupStatus> report)
{
    private static readonly TimeSpan ProgressLogInterval = TimeSpan.FromSeconds(2);

    private readonly EngineOptions _options = engine.Options;

    public async Task RunAsync(CancellationToken stopping, CancellationToken cancellationToken)
    {
        // On the engine's clock like every other deadline (a linked source cannot take a TimeProvider).
        using var deadline = new CancellationTokenSource(_options.StartupTimeout, engine.Time);
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, stopping, deadline.Token);

        // 1. Probe for each region's geometry and highest generation.
        HelloReply?[] probes;
        try
        {
            probes = await ProbeAsync(timeout.Token);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested && !stopping.IsCancellationRequested)
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
        int frameRoom = probes.Where(p => p is not null).Min(p => p!.MaxFrameBytes) - (64 << 10);
        int perBlock = first.BlockSize + BlockContext.Size;
        ulong highest = probes.Where(p => p is not null).Max(p => p!.HighestGeneration);
        // Validate() kept every highest below Wire.MaxGeneration: this cannot wrap (checked says so).
        ulong generation = _options.Generation ?? checked(highest + 1);
        if (_options.Generation is not null && generation < highest)
        {
            throw new InvalidOperationException($"generation {generation} is older than generation {highest}, which a replica has already seen; choose a higher one (or omit --generation)");
        }
        await engine.InvokeAsync(() =>
        {
            engine.BlockSize = first.BlockSize;
            engine.ExtentBlocks = first.ExtentBlocks;
            engine.ExtentCount = first.ExtentCount;
            engine.Size = first.RegionBytes;
            engine.MaxIoBytes = Math.Max(1, Math.Min(32 << 20, frameRoom) / perBlock) * first.BlockSize;
            engine.Generation = generation;
        });

        // 2. Connect read-write with our generation. One replica that refuses (or answers nonsense)
        // does not decide for the others: two suffice, and its maintainer brings it in later.
        var connected = new List<ReplicaConnection>();
        var replies = new HelloReply?[engine.Replicas.Length];
        for (int i = 0; i < engine.Replicas.Length; i++)
        {
            if (probes[i] is null)
            {
                continue;
            }
            var connection = new ReplicaConnection(engine, i);
            try
            {
                connection.Client = await connector.ConnectAsync(i, hello(probes[i]!.RegionId, false), connection, timeout.Token);
                if (ImplausibleActivationReply(connection.Region, generation) is { } why)
                {
                    await connection.Client.DisposeAsync();
                    throw new DownstairsProtocolException($"misbehaving replica: {why}");
                }
            }
            catch (Exception e) when (e is DownstairsRefusedException or DownstairsProtocolException or DownstairsConnectionException)
            {
                string what = e is DownstairsRefusedException r ? $"refused ({r.Result.Code})" : e is DownstairsProtocolException ? "misbehaving" : "unreachable";
                engine.Throttle.Report(LogLevel.Warning, $"replica {i} ({engine.Replicas[i].EndPoint}) {what} at activation", () => $"{e.Message}; starting without it");
                continue;
            }
            engine.Replicas[i].RegionId = connection.Region.RegionId;
            connected.Add(connection);
            replies[i] = connection.Region;
        }
        // The read-write reply is a second answer: a liar can change its story after the probe.
        LeaveOutImplausible(replies, "activation");
        foreach (ReplicaConnection c in connected.Where(c => replies[c.Replica] is null).ToList())
        {
            connected.Remove(c);
            await c.Client.DisposeAsync();
        }
        if (connected.Count < 2)
        {
            foreach (ReplicaConnection c in connected)
            {
                await c.Client.DisposeAsync();
            }
            throw new InvalidOperationException($"only {connected.Count} downstairs accepted activation at generation {generation} (see the warnings): cannot start a replicated volume");
        }
        foreach (ReplicaConnection c in connected)
        {
            HelloReply r = c.Region;
            EngineLog.Connected(engine.Logger, c.Replica, engine.Replicas[c.Replica].EndPoint.ToString(), r.RegionId, r.ExtentCount, (long)r.ExtentBlocks * r.BlockSize, r.BlockSize);
        }

        // 3. Reconcile: per extent, highest generation then highest flush number wins. Deciding is
        // metadata only; the copies it calls for then run several at a time.
        int extentCount = first.ExtentCount;
        var expected = new ExtentMeta[extentCount];
        var dirty = new List<int>();
        var copies = new List<(int Extent, ReplicaConnection From, ReplicaConnection To)>();
        ulong maxFlush = 0;
        for (int e = 0; e < extentCount; e++)
        {
            ReplicaConnection winner = connected[0];
            foreach (ReplicaConnection c in connected)
            {
                ExtentMeta m = c.Region.Extents[e];
                ExtentMeta w = winner.Region.Extents[e];
                if (m.Generation > w.Generation || (m.Generation == w.Generation && m.FlushNumber > w.FlushNumber))
                {
                    winner = c;
                }
            }
            ExtentMeta best = winner.Region.Extents[e];
            expected[e] = best;
            maxFlush = Math.Max(maxFlush, best.FlushNumber);
            bool anyDirty = connected.Exists(c => c.Region.Extents[e].Dirty);
            foreach (ReplicaConnection c in connected)
            {
                ExtentMeta m = c.Region.Extents[e];
                if (c != winner && (anyDirty || m.Generation != best.Generation || m.FlushNumber != best.FlushNumber))
                {
                    copies.Add((e, winner, c));
                }
            }
            if (anyDirty)
            {
                // The next flush will stamp it; until then a returning replica must copy it.
                dirty.Add(e);
            }
        }
        int repaired = 0;
        long started = engine.Time.GetTimestamp();
        long lastProgressLog = started;
        report(new StartupStatus("reconciling", 0, copies.Count, 0));
        // By extent, not by copy: two copies of one extent (to two replicas) never run at once.
        ILookup<int, (int Extent, ReplicaConnection From, ReplicaConnection To)> byExtent = copies.ToLookup(c => c.Extent);
        await ReplicaMaintainer.CopyAllAsync([.. byExtent.Select(g => g.Key)], async e =>
        {
            foreach ((int _, ReplicaConnection from, ReplicaConnection to) in byExtent[e])
            {
                timeout.Token.ThrowIfCancellationRequested();
                await ExtentCopier.CopyAsync(engine, from, to, e, expected[e], cancellationToken: timeout.Token);
                int done = Interlocked.Increment(ref repaired);
                report(new StartupStatus("reconciling", done, copies.Count, done));
                long last = Interlocked.Read(ref lastProgressLog);
                if (engine.Time.GetElapsedTime(last) > ProgressLogInterval && Interlocked.CompareExchange(ref lastProgressLog, engine.Time.GetTimestamp(), last) == last)
                {
                    // A replaced or long-dead replica can need every extent copied before the guest is served.
                    EngineLog.ReconcileProgress(engine.Logger, done, copies.Count, done, engine.Time.GetElapsedTime(started).TotalSeconds);
                }
            }
        }, timeout.Token, _options.RepairParallelism);

        await engine.InvokeAsync(() =>
        {
            foreach (Replica replica in engine.Replicas)
            {
                replica.Changes = new ChangeRecord(engine.ExtentBlocks, engine.BlockSize, _options.ChangeRecordGranuleBytes, _options.ChangeRecordMaxBytes);
            }
            engine.Expected = expected;
            engine.Dirty.UnionWith(dirty);
            engine.FlushNumber = maxFlush;
            foreach (ReplicaConnection c in connected)
            {
                engine.Replicas[c.Replica].Activate(c);
            }
            foreach (Replica replica in engine.Replicas)
            {
                if (replica.State == ReplicaState.Connecting)
                {
                    engine.RequestConnection(replica.Index);
                }
            }
            engine.Serving = true;
            engine.StartTicking();
        });
        EngineLog.Reconciled(engine.Logger, generation, connected.Count, repaired, maxFlush);
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
                engine.Throttle.Report(LogLevel.Warning, $"replica {i} ({engine.Replicas[i].EndPoint}) misbehaving at {stage}", () => $"misbehaving replica: its {why}; not used (live repair replaces its copy)");
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
    private static string? ImplausibleActivationReply(HelloReply reply, ulong generation)
    {
        for (int e = 0; e < reply.Extents.Length; e++)
        {
            ExtentMeta m = reply.Extents[e];
            if (m.Generation > generation)
            {
                return $"extent {e} has generation {m.Generation}, above generation {generation} it has just accepted";
            }
            if (m.FlushNumber >= Wire.MaxFlushNumber)
            {
                return $"extent {e} has flush number {m.FlushNumber}, at or above the ceiling {Wire.MaxFlushNumber}";
            }
        }
        return null;
    }

    /// <summary>Probes all three; returns once all answered, or once two did and the wait for the third ran out.</summary>
    private async Task<HelloReply?[]> ProbeAsync(CancellationToken startupToken)
    {
        // Probes still retrying when startup goes on (a replica that is down) must end here: the
        // maintainer takes that replica over. Left running they would probe it forever.
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
        var probes = new HelloReply?[engine.Replicas.Length];
        Task[] tasks = [.. engine.Replicas.Select((replica, i) => Task.Run(async () =>
        {
            TimeSpan delay = _options.ReconnectInitialDelay;
            while (!cancellationToken.IsCancellationRequested)
            {
                try
                {
                    var sink = new ReplicaConnection(engine, i);
                    await using IDownstairs probe = await connector.ConnectAsync(i, hello(Guid.Empty, true), sink, cancellationToken);
                    probe.Region.Validate();
                    probes[i] = probe.Region;
                    return;
                }
                catch (DownstairsProtocolException e)
                {
                    // Not down: answering with nonsense. Left out of this activation (the others decide the
                    // generation); the maintainer keeps trying it later like any absent replica.
                    engine.Throttle.Report(LogLevel.Warning, $"replica {i} ({replica.EndPoint}) misbehaving", () => $"{e.Message}; not used");
                }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    engine.Throttle.Report(LogLevel.Information, $"replica {i} ({replica.EndPoint}) unreachable", () => $"{e.Message}; retrying");
                }
                await Task.Delay(delay, engine.Time, cancellationToken).ContinueWith(static _ => { }, TaskScheduler.Default);
                delay = TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, _options.ReconnectMaxDelay.Ticks));
            }
        }, CancellationToken.None))];
        Task all = Task.WhenAll(tasks);
        await Task.WhenAny(all, Task.Delay(_options.StartupWaitForAll, engine.Time, cancellationToken)).ContinueWith(static _ => { }, TaskScheduler.Default);
        while (probes.Count(p => p is not null) < 2 && !all.IsCompleted)
        {
            cancellationToken.ThrowIfCancellationRequested();
            await Task.WhenAny(all, Task.Delay(100, cancellationToken)).ContinueWith(static _ => { }, TaskScheduler.Default);
        }
        cancellationToken.ThrowIfCancellationRequested();
        if (probes.Count(p => p is not null) < 2)
        {
            throw new InvalidOperationException($"fewer than two downstairs reachable within {_options.StartupTimeout.TotalSeconds:0} s ({string.Join(", ", _options.Downstairs)}): cannot start a replicated volume");
        }
        return probes;
    }
}
