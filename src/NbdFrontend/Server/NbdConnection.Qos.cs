using System.Runtime.CompilerServices;
using NbdServer.Common.Volumes;
using NbdServer.Frontend.Qos;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Server;

/// <summary>
/// QoS in the request loop. A request that must wait for its export's buckets waits here, before it
/// takes a request slot or budget bytes and before its payload is read: the loop reads nothing else
/// meanwhile, so the client is slowed by TCP backpressure, holds no memory of ours while it waits,
/// and never sees an error. Other connections (and other exports) have their own loops and go on.
/// </summary>
internal sealed partial class NbdConnection
{
    private QosWaiter? _qosWaiter;

    /// <summary>
    /// What a request counts against, or null for those that are not limited: FLUSH (the guest's
    /// durability point; delaying it buys nothing, the writes it covers were counted), CACHE (a hint
    /// we ignore), BLOCK_STATUS (metadata, no data moves) and DISC. TRIM is one write operation and no
    /// bytes: it moves no data (a hole punched, or nothing on a replicated volume), and charging its
    /// range would stall a guest's whole-disk discard (mkfs) for size / bandwidth seconds. WRITE_ZEROES
    /// is one write operation and, when the volume writes the zeroes (a replicated volume sends them to
    /// three replicas as ordinary writes), its length in bytes: otherwise it would be a way around the
    /// bandwidth limit. Where the volume zeroes without writing (it offers fast zero), it is like TRIM.
    /// </summary>
    private static (QosDirection Direction, long Bytes)? QosCharge(in NbdRequest request, NbdExport export) => request.Command switch
    {
        NbdCommand.Read => (QosDirection.Read, request.Length),
        NbdCommand.Write => (QosDirection.Write, request.Length),
        NbdCommand.Trim => (QosDirection.Write, 0),
        NbdCommand.WriteZeroes => (QosDirection.Write, (export.Volume.Features & VolumeFeatures.FastZero) != 0 ? 0 : request.Length),
        _ => null,
    };

    /// <summary>The batch path: takes the request's tokens if it may go now; false: it must wait (nothing taken).</summary>
    private static bool TryQosNow(in NbdRequest request, NbdExport export) =>
        !export.Qos.Active || QosCharge(request, export) is not { } charge || export.Qos.TryGoNow(charge.Direction, charge.Bytes);

    /// <summary>Gives back what <see cref="TryQosNow"/> took, for a request that could not be admitted after all.</summary>
    private static void RefundQos(in NbdRequest request, NbdExport export)
    {
        if (export.Qos.Active && QosCharge(request, export) is { } charge)
        {
            export.Qos.Refund(charge.Direction, charge.Bytes);
        }
    }

    /// <summary>
    /// <see cref="ThrottleAsync"/> for the one-at-a-time path. A request that waits is counted in
    /// flight (true: the caller owns that count): it was read and validated, so a shutdown answers it
    /// rather than dropping it, and wakes it (<see cref="WakeQosWaiter"/>) rather than waiting for its tokens.
    /// </summary>
    private async ValueTask<bool> ThrottleCountedAsync(NbdRequest request, NbdExport export, CancellationToken cancellationToken)
    {
        BeginRequest();
        try
        {
            await ThrottleAsync(request, export, cancellationToken);
            return true;
        }
        catch
        {
            EndRequest();
            throw;
        }
    }

    /// <summary>A shutdown began: a request waiting for its tokens goes now.</summary>
    private void WakeQosWaiter()
    {
        // Pairs with the check after arming in WaitForQosAsync: either the loop sees the flag, or we see its waiter armed.
        Interlocked.MemoryBarrier();
        Volatile.Read(ref _qosWaiter)?.Wake();
    }

    /// <summary>Waits until the request's export lets it go (at once when no limit is set).</summary>
    private ValueTask ThrottleAsync(in NbdRequest request, NbdExport export, CancellationToken cancellationToken)
    {
        QosLimiter qos = export.Qos;
        if (!qos.Active || QosCharge(request, export) is not { } charge)
        {
            return ValueTask.CompletedTask;
        }
        if (_qosWaiter is null || _qosWaiter.Time != qos.Time)
        {
            _qosWaiter?.Dispose();
            Volatile.Write(ref _qosWaiter, new QosWaiter(qos.Time));
        }
        long wait = qos.Reserve(charge.Direction, charge.Bytes, out long version);
        return wait == 0 ? ValueTask.CompletedTask : WaitForQosAsync(qos, charge.Direction, charge.Bytes, wait, version, cancellationToken);
    }

    // Pooled: a throttled connection waits once per request, and its state machine is reused rather than allocated each time.
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask WaitForQosAsync(QosLimiter qos, QosDirection direction, long bytes, long wait, long version, CancellationToken cancellationToken)
    {
        QosWaiter waiter = _qosWaiter!;
        TimeProvider time = qos.Time;
        long started = time.GetTimestamp();
        long due = started + wait;
        try
        {
            while (true)
            {
                long now = time.GetTimestamp();
                if (now >= due || _shuttingDown)
                {
                    return;
                }
                ValueTask waiting = waiter.WaitAsync(due - now, cancellationToken);
                if (qos.Register(waiter, version) || _shuttingDown)
                {
                    // Registered only once armed, so a change (or a shutdown) that came before found nobody to wake.
                    waiter.Wake();
                }
                await waiting;
                if (_shuttingDown)
                {
                    return;
                }
                if (qos.Changed(version))
                {
                    wait = qos.Rereserve(direction, bytes, ref version);
                    if (wait == 0)
                    {
                        return;
                    }
                    due = time.GetTimestamp() + wait;
                }
            }
        }
        finally
        {
            qos.Done(waiter, time.GetTimestamp() - started);
        }
    }
}
