using System.Collections.Concurrent;

namespace NbdServer.Downstairs.Storage;

/// <summary>
/// Threads that only wait in fsync. A flush hands every dirty extent's fdatasync to them at once;
/// the thread pool would ramp up far too slowly for calls that block for milliseconds.
/// </summary>
internal static class FsyncPool
{
    /// <summary>Concurrent fsyncs; more than the dirty extents of one flush at 4k random load on 1 GiB (32).</summary>
    public const int Threads = 32;

    private static readonly BlockingCollection<Action> Work = Start();

    public static void Run(Action action) => Work.Add(action);

    private static BlockingCollection<Action> Start()
    {
        var work = new BlockingCollection<Action>();
        for (int i = 0; i < Threads; i++)
        {
            new Thread(() =>
            {
                foreach (Action a in work.GetConsumingEnumerable())
                {
                    a();
                }
            })
            { IsBackground = true, Name = $"ds-fsync-{i}" }.Start();
        }
        return work;
    }
}
