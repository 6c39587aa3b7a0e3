using System.Buffers;
using System.IO.Pipelines;

namespace NbdServer.Frontend.Server;

internal static class PipeReaderExtensions
{
    /// <summary>
    /// Fills <paramref name="destination"/>, copying data out as it arrives (so the pipe never has to
    /// hold a whole 32 MiB payload). False on a clean end of stream before the first byte.
    /// </summary>
    public static async ValueTask<bool> ReadExactlyAsync(this PipeReader reader, Memory<byte> destination, CancellationToken cancellationToken)
    {
        bool started = false;
        while (!destination.IsEmpty)
        {
            ReadResult result = await reader.ReadAsync(cancellationToken);
            ReadOnlySequence<byte> buffer = result.Buffer;
            if (buffer.IsEmpty && (result.IsCompleted || result.IsCanceled))
            {
                reader.AdvanceTo(buffer.Start);
                return started ? throw new EndOfStreamException("connection closed in the middle of a message") : false;
            }
            int count = (int)Math.Min(buffer.Length, destination.Length);
            buffer.Slice(0, count).CopyTo(destination.Span);
            reader.AdvanceTo(buffer.GetPosition(count));
            destination = destination[count..];
            started = true;
        }
        return true;
    }

    /// <summary>Reads and drops <paramref name="count"/> bytes without buffering them.</summary>
    public static async ValueTask SkipAsync(this PipeReader reader, long count, CancellationToken cancellationToken)
    {
        while (count > 0)
        {
            ReadResult result = await reader.ReadAsync(cancellationToken);
            ReadOnlySequence<byte> buffer = result.Buffer;
            if (buffer.IsEmpty && (result.IsCompleted || result.IsCanceled))
            {
                reader.AdvanceTo(buffer.Start);
                throw new EndOfStreamException("connection closed in the middle of a message");
            }
            long take = Math.Min(buffer.Length, count);
            reader.AdvanceTo(buffer.GetPosition(take));
            count -= take;
        }
    }
}
