using System.CommandLine;

namespace NbdServer.Common.Cli;

/// <summary>
/// What a command's help and man page say besides its options: the synopsis lines, the description,
/// the titles under which its options are grouped, and sections after them (SIZES, EXIT STATUS…).
/// The options' own text is their <see cref="Symbol.Description"/> and <see cref="Option.HelpName"/>.
/// </summary>
public sealed record CommandDoc
{
    public IReadOnlyList<string> Synopsis { get; init; } = [];

    public string Description { get; init; } = "";

    /// <summary>Option groups in order; options of the command in no group are listed under OPTIONS.</summary>
    public IReadOnlyList<(string Title, IReadOnlyList<Option> Options)> Groups { get; init; } = [];

    /// <summary>Sections after the options, in order (title, text; the text may hold indented lines).</summary>
    public IReadOnlyList<(string Title, string Text)> Sections { get; init; } = [];
}
